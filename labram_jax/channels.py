"""Map EEG channel names, as recording files spell them, to LaBraM ``pos_embed`` rows.

LaBraM learns one ``pos_embed`` row per channel: row 0 belongs to the cls token and
rows 1..128 to channel slots. The original code indexes it with
``[0] + [standard_1020.index(name) + 1 for name in ch_names]``; ``STANDARD_1020`` below is
that vocabulary, verbatim, so a name's row is its index + 1.

One deliberate improvement over the original: names are compared case-insensitively.
The original upper-cased channel names, so its mixed-case entries (``FTT9h`` ...) could
never match; here they reach the row the table reserves for them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from labram_jax.configs import NUM_CHANNEL_ROWS
from labram_jax.errors import UserError

STANDARD_1020: tuple[str, ...] = (
    'FP1', 'FPZ', 'FP2',
    'AF9', 'AF7', 'AF5', 'AF3', 'AF1', 'AFZ', 'AF2', 'AF4', 'AF6', 'AF8', 'AF10',
    'F9', 'F7', 'F5', 'F3', 'F1', 'FZ', 'F2', 'F4', 'F6', 'F8', 'F10',
    'FT9', 'FT7', 'FC5', 'FC3', 'FC1', 'FCZ', 'FC2', 'FC4', 'FC6', 'FT8', 'FT10',
    'T9', 'T7', 'C5', 'C3', 'C1', 'CZ', 'C2', 'C4', 'C6', 'T8', 'T10',
    'TP9', 'TP7', 'CP5', 'CP3', 'CP1', 'CPZ', 'CP2', 'CP4', 'CP6', 'TP8', 'TP10',
    'P9', 'P7', 'P5', 'P3', 'P1', 'PZ', 'P2', 'P4', 'P6', 'P8', 'P10',
    'PO9', 'PO7', 'PO5', 'PO3', 'PO1', 'POZ', 'PO2', 'PO4', 'PO6', 'PO8', 'PO10',
    'O1', 'OZ', 'O2', 'O9', 'CB1', 'CB2', 'IZ', 'O10',
    'T3', 'T5', 'T4', 'T6', 'M1', 'M2', 'A1', 'A2',
    'CFC1', 'CFC2', 'CFC3', 'CFC4', 'CFC5', 'CFC6', 'CFC7', 'CFC8',
    'CCP1', 'CCP2', 'CCP3', 'CCP4', 'CCP5', 'CCP6', 'CCP7', 'CCP8',
    'T1', 'T2', 'FTT9h', 'TTP7h', 'TPP9h', 'FTT10h', 'TPP8h', 'TPP10h',
    'FP1-F7', 'F7-T7', 'T7-P7', 'P7-O1', 'FP2-F8', 'F8-T8', 'T8-P8', 'P8-O2',
    'FP1-F3', 'F3-C3', 'C3-P3', 'P3-O1', 'FP2-F4', 'F4-C4', 'C4-P4', 'P4-O2',
)

# pos_embed has 129 rows (NUM_CHANNEL_ROWS + cls), so vocabulary rows 129..136 would index past its end.

# TUAB/TUEV montage order (files spell them 'EEG FP1-REF' ...).
TUH_CHANNELS: tuple[str, ...] = (
    'FP1', 'FP2', 'F3', 'F4', 'C3', 'C4', 'P3', 'P4', 'O1', 'O2', 'F7', 'F8',
    'T3', 'T4', 'T5', 'T6', 'A1', 'A2', 'FZ', 'CZ', 'PZ', 'T1', 'T2',
)

# Second halves of 'X-Y' that mean "X recorded against a reference", not a bipolar pair:
# generic reference (REF), linked/left/right ears or mastoids (LE, RE, LM, RM, MA and the
# electrodes A1/A2/M1/M2 themselves), average references (AR, AV, AVG, CAR). Scalp sites
# are deliberately absent so bipolar pairs such as C3-P3 never collapse onto C3.
REFERENCE_LABELS = frozenset(
    {'REF', 'LE', 'RE', 'LM', 'RM', 'MA', 'A1', 'A2', 'M1', 'M2', 'AR', 'AV', 'AVG', 'CAR'})

_ROW_BY_NAME = {name.upper(): row for row, name in enumerate(STANDARD_1020, start=1)
                if row <= NUM_CHANNEL_ROWS}
_TYPE_PREFIX = re.compile(r'^EEG[ :-]\s*', re.IGNORECASE)


def _clean(name: str) -> str:
    # PhysioNet EEGMMIDB pads names with dots ('Fc5.', 'Iz..').
    return _TYPE_PREFIX.sub('', name.strip().rstrip('.').strip()).strip().upper()


def channel_row(name: str) -> int | None:
    """The ``pos_embed`` row (1..128) for a channel name, or None if it has none."""
    cleaned = _clean(name)
    if cleaned in _ROW_BY_NAME:
        return _ROW_BY_NAME[cleaned]
    site, sep, ref = cleaned.partition('-')
    if sep and '-' not in ref and ref.strip() in REFERENCE_LABELS:
        return _ROW_BY_NAME.get(site.strip())
    return None


@dataclass(frozen=True)
class ResolvedChannels:
    """Channels that map to ``pos_embed`` rows, and which of the caller's did not."""

    names: tuple[str, ...]    # vocabulary spelling of each kept channel
    rows: tuple[int, ...]     # pos_embed rows, 1..128
    kept: tuple[int, ...]     # positions in the caller's list, for slicing its data
    dropped: tuple[str, ...]  # caller's names that could not be mapped

    @property
    def input_chans(self) -> np.ndarray:
        """LaBraM ``input_chans``: int32 [N + 1], led by the cls row 0."""
        return np.asarray((0,) + self.rows, dtype=np.int32)


def _quoted(names: Sequence[str], limit: int = 20) -> str:
    shown = ', '.join(repr(n) for n in names[:limit])
    return shown + (f', ... ({len(names) - limit} more)' if len(names) > limit else '')


def resolve_channels(names: Sequence[str], *, drop_unknown: bool = False) -> ResolvedChannels:
    """Map channel names to ``pos_embed`` rows.

    Raises ValueError for unmapped names (unless ``drop_unknown``), for two names that
    map to the same row, and when no name maps at all.
    """
    if isinstance(names, str):  # a bare string would be resolved letter by letter
        raise TypeError('names must be a sequence of channel names, not a str')
    names = list(names)
    rows = [channel_row(n) for n in names]
    dropped = [n for n, r in zip(names, rows) if r is None]
    if dropped and not drop_unknown:
        raise UserError('unknown EEG channel names (not in the LaBraM 10-20 vocabulary): '
                        f'{_quoted(dropped)}; pass drop_unknown=True to drop them')
    kept = [i for i, r in enumerate(rows) if r is not None]
    first_at_row: dict[int, int] = {}
    clashes = []
    for i in kept:
        j = first_at_row.setdefault(rows[i], i)
        if j != i:
            clashes.append(f'{names[j]!r} and {names[i]!r} (row {rows[i]})')
    if clashes:
        raise UserError('channel names map to the same pos_embed row: ' + '; '.join(clashes))
    if not kept:
        raise UserError(f'no channel could be mapped to the LaBraM 10-20 vocabulary: '
                        f'{_quoted(names)}')
    return ResolvedChannels(
        names=tuple(STANDARD_1020[rows[i] - 1] for i in kept),
        rows=tuple(rows[i] for i in kept),
        kept=tuple(kept),
        dropped=tuple(dropped),
    )
