"""The setting vocabulary every layer shares: a compression setting, its bounds, the patch sizes an
image allows, the `keep:patch[:merge]` strategy syntax and the default strategy grid.

Pure: no torch and no recipe types, so a recipe can be validated without importing a model.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_MERGE = 0.5  # token merging: bipartite matching can remove at most half of a block's tokens


def allowed_patch_sizes(image_size: int, base: int, stride: int = 1) -> list[int]:
    """Patch sizes a curriculum may use: divisors of the image size no smaller than the base, and
    multiples of the convolutional stem's stride (the projection embeds whole cells of its map)."""
    return [p for p in range(base, image_size + 1) if image_size % p == 0 and p % stride == 0]


def stem_stride(stem: list[int] | tuple[int, ...]) -> int:
    """Pixels per cell of a convolutional stem's output map: each of its layers halves the resolution."""
    return 2 ** len(stem)


def keep_ok(value: float | None) -> bool:
    return value is not None and 0 < value <= 1


def merge_ok(value: float | None) -> bool:
    return value is not None and 0 <= value <= MAX_MERGE


def strategy_rule(allowed_patches: list[int]) -> str:
    """What `keep_ok`, `merge_ok` and the allowed patch sizes ask of a strategy, for error messages."""
    return f"keep in (0, 1], patch one of {allowed_patches}, merge in [0, {MAX_MERGE:g}]"


@dataclass(frozen=True)
class Setting:
    """A compression setting: keep ratio of patch tokens, patch size in pixels, and the fraction of
    patch tokens each block merges away (ToMe; 0: no merging)."""

    keep: float
    patch: int
    merge: float = 0.0

    @property
    def label(self) -> str:
        """keep:patch, or keep:patch:merge when it merges (the strategy syntax)."""
        return f"{self.keep:g}:{self.patch}" + (f":{self.merge:g}" if self.merge else "")

    def fits(self, allowed_patches: list[int]) -> bool:
        """keep in (0, 1], patch one of `allowed_patches`, merge in [0, MAX_MERGE]."""
        return keep_ok(self.keep) and self.patch in allowed_patches and merge_ok(self.merge)

    def full_tokens(self) -> Setting:
        """The same patch size with every token kept and none merged (momentum encoders)."""
        return Setting(1.0, self.patch)


def snap_patch(value: float, allowed: list[int]) -> int:
    """The allowed patch size nearest to `value` (ties go to the smaller, less compressed one)."""
    return min(allowed, key=lambda p: (abs(p - value), p))


def patch_for_size(patch: int, size: int, base_patch: int, stride: int = 1) -> int:
    """Patch size for a view of side `size` (e.g. a DINO local crop) when global views use `patch`.

    The same pixel patch size, snapped to the allowed sizes of that view (divisors of `size` no
    smaller than the base, multiples of the stem's `stride`), so the patch-scaling factor is the
    same for every view.
    """
    return snap_patch(patch, allowed_patch_sizes(size, base_patch, stride))


def parse_strategies(text: str) -> list[Setting]:
    """'1.0:16,0.5:16,0.25:32,1:16:0.2' -> settings (keep:patch or keep:patch:merge)."""
    out = []
    for item in text.split(","):
        fields = item.strip().split(":")
        try:
            if len(fields) not in (2, 3):
                raise ValueError
            out.append(
                Setting(float(fields[0]), int(fields[1]), float(fields[2]) if len(fields) == 3 else 0.0)
            )
        except ValueError:
            raise ValueError(
                f"--strategies: {item!r} is not keep:patch[:merge] (e.g. 0.5:16 or 1:16:0.2)"
            ) from None
    return out


def setting_of(decision: dict) -> Setting:
    """The setting a record names: an adaptive decision, a report row (keep, patch, merge if any)."""
    return Setting(decision["keep"], decision["patch"], decision.get("merge", 0.0))


def default_strategies(base: int, allowed: list[int]) -> list[Setting]:
    patches = [p for p in (base, 2 * base) if p in allowed] or [base]
    return [Setting(k, p) for p in patches for k in (1.0, 0.5, 0.25) if (k, p) != (1.0, base)]


def strategies_or_default(text: str | None, base: int, allowed: list[int]) -> list[Setting]:
    """The keep:patch[:merge] strategies of `text`, or the default grid when it is empty."""
    return parse_strategies(text) if text else default_strategies(base, allowed)


def num_patches(image_size: int, patch: int) -> int:
    return (image_size // patch) ** 2


def kept_patches(patches: int, keep: float) -> int:
    """Patch tokens kept by token dropout: round(keep * patches), at least one."""
    return max(1, min(patches, round(keep * patches)))
