"""The demo: a byte-level corpus of the Python standard library, a tiny GPT, and the run that
compares what the law predicts with what training observes."""
