"""Training data: corpora (corpus.py), the sentencepiece tokenizer (tokenizer.py), and the token
stores and grain pipeline the training loop reads (pipeline.py: prepare_data, train_iterator,
eval_batches)."""
