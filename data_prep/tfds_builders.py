"""TFDS builders of TUAB, TUEV and EEGMAT (`labram_tuab`, `labram_tuev`, `labram_eegmat`), array_record format.

They run the builders' plans (`data_prep.builders`) through the corpus engine's per-recording step
(`data_prep.engine.prepare`: reading, quality checks, preprocessing, windows), so an example here is a window
there. Features: `x` float32 [N, A, 200] (µV), `input_chans` int32 [N + 1] (led by the cls row 0), `label` int64,
`subject` and `recording` (text, read back as bytes), `start` float32 (s). Splits: train, validation, test.
Files the builders reject are logged and left out; use `data_prep.builders` for a report.json.

    builder = LabramEegmat(data_dir=DATA_DIR)            # options: seconds, splits, notch, workers, ...
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=CORPUS_ROOT))
    source = tfds.data_source("labram_eegmat", data_dir=DATA_DIR)   # or builder.as_data_source()

When TensorFlow is needed: building writes each split through TFDS's shuffler, which holds up to 1 GB of
serialized examples in memory and spills the rest to disk through `tf.io.gfile`. A split over 1 GB therefore needs
TensorFlow (`pip install tensorflow`; 2.21.0 resolves with this project's pins); without it the build fails with
"No module named 'tensorflow'". The full TUAB and TUEV builds are far over 1 GB per split, so they need it.
EEGMAT (1,728 five-second windows, about 140 MB of float32 in all) builds without TensorFlow, and reading any
build with `tfds.data_source` never needs it. Without TensorFlow, `data_prep.builders` writes the same windows.
"""
from __future__ import annotations

import abc
import logging
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import tensorflow_datasets as tfds

from data_prep.builders.eegmat import plan_eegmat
from data_prep.builders.tuab import plan_tuab
from data_prep.builders.tuev import plan_tuev
from data_prep.engine import prepared
from data_prep.plan import Plan
from labram_jax.configs import PATCH_SIZE

log = logging.getLogger(__name__)
TFDS_SPLIT = {"train": "train", "val": "validation", "test": "test"}


class _LabramBuilder(tfds.core.GeneratorBasedBuilder):
    """Shared by the three builders: features, split generators, one example per window."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Windows as the original LaBraM dataset makers cut them."}
    DESCRIPTION = ""
    HOMEPAGE = ""
    MANUAL_DOWNLOAD_INSTRUCTIONS = ""
    # TFDS looks for a checksums file beside a builder's code; these download nothing, and that lookup imports the
    # importlib_resources backport, which tensorflow-datasets does not install.
    code_path = None

    def __init__(self, *, workers: int = 1, **kwargs: Any) -> None:
        self._workers = workers
        kwargs.setdefault("file_format", "array_record")
        super().__init__(**kwargs)

    @abc.abstractmethod
    def _plan(self, root: Path) -> Plan:
        """Files, splits, subjects and labels, from the corpus at `root`."""

    def _info(self) -> tfds.core.DatasetInfo:
        features = tfds.features.FeaturesDict({
            # More than one unknown dimension needs an explicit encoding; raw bytes keep float32 exact.
            "x": tfds.features.Tensor(shape=(None, None, PATCH_SIZE), dtype=np.float32, encoding="bytes"),
            "input_chans": tfds.features.Tensor(shape=(None,), dtype=np.int32),
            "label": tfds.features.Scalar(dtype=np.int64),
            "subject": tfds.features.Text(),
            "recording": tfds.features.Text(),
            "start": tfds.features.Scalar(dtype=np.float32),
        })
        # disable_shuffling keeps the examples in the builders' order (sorted files, windows in time order).
        return tfds.core.DatasetInfo(builder=self, description=self.DESCRIPTION, features=features,
                                     homepage=self.HOMEPAGE, disable_shuffling=True,
                                     metadata=tfds.core.MetadataDict())

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Iterator]:
        plan = self._plan(Path(dl_manager.manual_dir))
        for item in plan.of_split(""):
            log.warning("%s left out: %s", item.recording, item.reject or item.skip)
        self.info.metadata.update(preprocessing=plan.details, split_rule=plan.split_rule)
        return {TFDS_SPLIT[split]: self._generate_examples(plan, split)
                for split in TFDS_SPLIT if plan.of_split(split)}

    def _generate_examples(self, plan: Plan, split: str) -> Iterator[tuple[str, dict[str, Any]]]:
        for result in prepared([(item, plan.rule) for item in plan.of_split(split)], self._workers):
            if result.windows is None:
                log.warning("%s left out: %s", result.item.recording, result.entry.get("reason"))
                continue
            for index, window in enumerate(result.records()):
                yield f"{window.recording}#{index:06d}", {
                    "x": np.asarray(window.signal, np.float32), "input_chans": window.input_chans,
                    "label": window.label, "subject": window.subject, "recording": window.recording,
                    "start": window.start}


class LabramTuab(_LabramBuilder):
    """TUAB abnormal (1) vs normal (0), 10-s windows; see `data_prep.builders.tuab`. manual_dir: the TUAB v3 root."""

    name = "labram_tuab"
    DESCRIPTION = __doc__
    HOMEPAGE = "https://isip.piconepress.com/projects/nedc/html/tuh_eeg/"
    MANUAL_DOWNLOAD_INSTRUCTIONS = "manual_dir: the TUAB v3 release folder (with edf/{train,eval}/{abnormal,normal})."

    def __init__(self, *, seed: int = 12345, val_fraction: float = 0.2, montage: str = "01_tcp_ar",
                 notch: float | None = 50.0, **kwargs: Any) -> None:
        self._options = dict(seed=seed, val_fraction=val_fraction, montage=montage, notch=notch)
        super().__init__(**kwargs)

    def _plan(self, root: Path) -> Plan:
        return plan_tuab(root, **self._options)


class LabramTuev(_LabramBuilder):
    """TUEV 6-class events (0 SPSW .. 5 BCKG), 5-s windows; see `data_prep.builders.tuev`. manual_dir: TUEV v2."""

    name = "labram_tuev"
    DESCRIPTION = __doc__
    HOMEPAGE = "https://isip.piconepress.com/projects/nedc/html/tuh_eeg/"
    MANUAL_DOWNLOAD_INSTRUCTIONS = "manual_dir: the TUEV v2 release folder (with edf/{train,eval}/<subject>)."

    def __init__(self, *, seed: int = 4523, val_fraction: float = 0.2, notch: float | None = 50.0,
                 **kwargs: Any) -> None:
        self._options = dict(seed=seed, val_fraction=val_fraction, notch=notch)
        super().__init__(**kwargs)

    def _plan(self, root: Path) -> Plan:
        return plan_tuev(root, **self._options)


class LabramEegmat(_LabramBuilder):
    """PhysioNet EEGMAT rest (0) vs task (1), 5-s windows; see `data_prep.builders.eegmat`. manual_dir: its EDFs."""

    name = "labram_eegmat"
    DESCRIPTION = __doc__
    HOMEPAGE = "https://physionet.org/content/eegmat/1.0.0/"
    MANUAL_DOWNLOAD_INSTRUCTIONS = "manual_dir: the folder of SubjectNN_1.edf / SubjectNN_2.edf files."

    def __init__(self, *, seconds: int = 5, stride: int | None = None,
                 splits: Mapping[str, Sequence[int]] | None = None, include_a2: bool = True,
                 notch: float | None = 50.0, **kwargs: Any) -> None:
        self._options = dict(seconds=seconds, stride=stride, splits=splits, include_a2=include_a2, notch=notch)
        super().__init__(**kwargs)

    def _plan(self, root: Path) -> Plan:
        return plan_eegmat(root, **self._options)
