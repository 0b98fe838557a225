"""Training data: corpora (corpus.py); the tokenizers (tokenizer.py: the interface and
sentencepiece, hf_tokenizer.py: a Hugging Face tokenizer.json, special_tokens.py: DeepSeek's chat
markers); and the token stores and grain pipeline the training loop reads (pipeline.py:
prepare_data, train_iterator, eval_batches)."""
