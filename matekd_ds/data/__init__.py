"""Task data: the GLUE registry (glue.py), file and hub loaders (loaders.py), the synthetic
offline task (synthetic.py), a run's splits and task spec (tasks.py), tokenisation, batching and
sharding (batching.py), and the builtin tokenizer (tokenizer.py).

Nothing is imported here, so any submodule imports cold on its own."""
