"""Few-shot sampling in the two conventions the field uses (LP++/ProLIP and CoOp), deterministic per seed and
exchangeable as JSON.

- "lpp" (LP++ / ProLIP): ``random.seed(seed)``; per class K support and K validation images (drawn with replacement
  when a class is short and ``allow_fewer``); with ``imagenet_style`` 2K are drawn from train, first K support, last K
  validation.
- "coop" (CoOp): ``random.seed(seed)``; per class K without replacement (a short class keeps all it has);
  validation = min(K, 4) per class from the validation split.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from prolip.choices import SAMPLERS
from prolip.errors import ProlipError


class NotEnoughImagesError(ProlipError, ValueError):
    pass


@dataclass(frozen=True)
class FewShotSplit:
    train_indices: list[int]
    val_indices: list[int]
    convention: str
    seed: int
    shots: int
    val_from: str = "val"  # which split val_indices index: "val" or "train"

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> FewShotSplit:
        return cls(**json.loads(text))

    def save(self, path: Path | str) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def load(cls, path: Path | str) -> FewShotSplit:
        return cls.from_json(Path(path).read_text())


def _by_class(labels: Sequence[int]) -> dict[int, list[int]]:
    # Classes in order of first appearance, as CoOp's (Dassl's) defaultdict tracker visits them: the same
    # random stream then draws the same images as CoOp / LP++ do on a split file whose classes are not sorted.
    groups: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        groups.setdefault(int(y), []).append(i)
    return groups


def _check(groups: dict[int, list[int]], need: int, allow_fewer: bool, classnames, what: str) -> None:
    for c, idx in groups.items():
        if len(idx) < need and not allow_fewer:
            name = classnames[c] if classnames is not None else c
            raise NotEnoughImagesError(
                f"class {name!r} has {len(idx)} {what} images but {need} are needed; "
                f"lower --shots or pass --allow-fewer"
            )


def sample_few_shot(
    labels: Sequence[int],
    shots: int,
    seed: int,
    convention: str = "lpp",
    *,
    allow_fewer: bool = False,
    val_labels: Sequence[int] | None = None,
    imagenet_style: bool = False,
    classnames: Sequence[str] | None = None,
) -> FewShotSplit:
    """Pick ``shots`` support images per class (indices into ``labels``) and a validation set.

    Validation indices index ``val_labels`` when given, else ``labels`` (then disjoint from the support when the
    class has enough images).
    """
    if shots <= 0:
        raise ValueError(f"--shots must be a positive number of images per class, got {shots}")
    if convention not in SAMPLERS:
        raise ValueError(f"unknown sampler {convention!r}; use one of {', '.join(SAMPLERS)}")
    rng = random.Random(seed)
    groups = _by_class(labels)
    val_groups = _by_class(val_labels) if val_labels is not None else None
    train, val = [], []
    if convention == "coop":
        _check(groups, shots, allow_fewer, classnames, "training")
        for idx in groups.values():
            train.extend(rng.sample(idx, shots) if len(idx) >= shots else list(idx))
        k_val = min(shots, 4)
        for idx in (val_groups or {}).values():
            val.extend(rng.sample(idx, k_val) if len(idx) >= k_val else list(idx))
    else:
        need = 2 * shots if imagenet_style else shots
        _check(groups, need, allow_fewer, classnames, "training")
        for idx in groups.values():
            drawn = rng.sample(idx, need) if len(idx) >= need else rng.choices(idx, k=need)
            train.extend(drawn[:shots])
            if imagenet_style:
                val.extend(drawn[shots:])
        if not imagenet_style and val_groups is not None:
            for idx in val_groups.values():
                val.extend(rng.sample(idx, shots) if len(idx) >= shots else rng.choices(idx, k=shots))
    if val_groups is None and not imagenet_style:
        # No validation split: draw validation from the training images the support did not use.
        used = set(train)
        for idx in groups.values():
            rest = [i for i in idx if i not in used]
            k = shots if convention == "lpp" else min(shots, 4)
            val.extend(rng.sample(rest, min(k, len(rest))))
    val_from = "val" if val_groups is not None else "train"
    return FewShotSplit(train, val, convention, seed, shots, val_from)


def base_new_split(num_classes: int) -> tuple[list[int], list[int]]:
    """Base = the first ⌈C/2⌉ labels, new = the rest (CoOp's base-to-new convention)."""
    m = math.ceil(num_classes / 2)
    return list(range(m)), list(range(m, num_classes))


def relabel(labels: Sequence[int], classes: Sequence[int]) -> tuple[list[int], list[int]]:
    """Keep the samples whose label is in ``classes``; returns (kept indices, labels renumbered 0..len-1)."""
    new = {c: i for i, c in enumerate(classes)}
    kept = [i for i, y in enumerate(labels) if y in new]
    return kept, [new[labels[i]] for i in kept]
