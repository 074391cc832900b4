"""python -m reflectionflow.world.data: rewrite the shipped GenEval-Shapes prompt files."""

from . import overlap, write

write()
for tag, share in overlap().items():
    print(f"{tag:14s} validation prompts also in the benchmark: {share:.0%}")
