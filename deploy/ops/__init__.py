"""Operator tools: the commands ``adaptloop`` dispatches (``adaptloop.cli``) and their helpers.

They sit on top of the import graph: they may import the kernel (``adaptloop``) and every stage
(``adaptloop.streams``, ``.trainers``, ``.serving``); the kernel and the stages import none of them.
"""
