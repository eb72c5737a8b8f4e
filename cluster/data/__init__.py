"""Data for every stage: raw documents (sources, files, synthetic), cleaning and the tokenizer,
corpus preparation's Ray Data steps (pipeline, tally), packing, the prepared Corpus, labelled task
data, and the readers that feed the training workers (ingest).
"""
