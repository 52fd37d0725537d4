"""Data: files of records in (records.py), checked and normalised; the tokenizer (tokenizer.py);
conversations through the chat template with their trained spans (conversations.py); a dataset
per training stage (datasets.py); batches (batching.py)."""
