"""Choices several layers check (the CLI's options, the experiment schema, the episode, the cache), declared once
here with no imports, so `prolip --help` reads them without loading the data readers (numpy, PIL)."""

# The few-shot sampling conventions (prolip.data.sampling.sample_few_shot): LP++/ProLIP's draw, or CoOp's.
SAMPLERS = ("lpp", "coop")
# What an unreadable image does: stop the run, or leave the image out (counted and listed).
ON_BAD_IMAGE = ("error", "skip")
