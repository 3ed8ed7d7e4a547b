"""Sharing a finished output: ``vqpipe publish`` writes its dataset card and uploads it to the Hub."""
