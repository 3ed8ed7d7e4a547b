"""single_threaded_pool: decode and stream threads run torch on one thread each, and leave the
rest of the process as it was."""

import threading

import torch

from vqpipe.torch_threads import single_threaded_pool, torch_threads_of


def test_pool_threads_run_one_torch_thread_and_the_caller_keeps_its_own():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        pool = single_threaded_pool(2, "test-decode")
        assert torch_threads_of(pool, 2) == [1, 1]
        assert torch.get_num_threads() == 2
        later = []  # a thread made afterwards starts from the process default, not from 1
        t = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
        t.start()
        t.join()
        assert later == [2]
        # the work itself runs there: a resize submitted to the pool sees one thread
        assert pool.submit(torch.get_num_threads).result() == 1
        pool.shutdown()
    finally:
        torch.set_num_threads(before)
