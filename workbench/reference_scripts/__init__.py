"""Scripts that run the reference libraries (dictionary_learning, SAELens) in a separate process.

Importing dictionary_learning imports nnsight, which patches torch globally, and SAELens is heavy: the
workbench never imports either in its own process. Run these with `python -m`, never import them.
"""
