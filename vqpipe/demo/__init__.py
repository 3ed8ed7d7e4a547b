"""Demo assets: ``train_tokenizer`` trains the small VQ tokenizer shipped in ``vqpipe/assets/demo-vq``
on scikit-image's public-domain sample photos, and holds the held-out evaluation the tests reuse."""
