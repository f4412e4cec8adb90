"""A plugin written against arkfed 0.1's flat import paths still loads, reads its data and trains
through the public API, with one DeprecationWarning per old module naming its new place."""

from __future__ import annotations

import subprocess
import sys
import textwrap

OLD_STYLE_PLUGIN = '''
from pathlib import Path

import numpy as np

from arkfed.dataset import DatasetTable, make_meta
from arkfed.errors import ArkfedError
from arkfed.label_files import FileDatasetOptions, LabelRecords, read_csv, require_columns
from arkfed.plugins import DatasetPlugin, SplitConfig, register_dataset
from arkfed.schema import LabelSchema


@register_dataset
class OldStyle(DatasetPlugin):
    name = "old_style"
    description = "written against arkfed 0.1's import paths"
    schema = LabelSchema(task="binary", classes=("Finding",))
    Options = FileDatasetOptions

    def read_records(self, root: Path) -> LabelRecords:
        frame = read_csv(root / "labels.csv")
        require_columns(frame, ["image", "patient", "finding"], root / "labels.csv")
        if (frame["finding"] > 1).any():
            raise ArkfedError("finding must be 0 or 1")
        paths = np.array([str(root / name) for name in frame["image"]])
        labels = frame[["finding"]].to_numpy(dtype=np.float32)
        meta = make_meta(len(frame), patient_id=frame["patient"].astype(str).tolist())
        return LabelRecords(paths=paths, labels=labels, meta=meta, classes=self.schema.classes, source=root / "labels.csv")
'''

SCRIPT = '''
import sys, warnings
warnings.simplefilter("always", DeprecationWarning)
from pathlib import Path
folder, data = Path(sys.argv[1]), Path(sys.argv[2])
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always", DeprecationWarning)
    from arkfed.datasets import DatasetPlugin, SplitConfig, get_plugin
    cls = get_plugin("old_style", [folder])
moved = sorted({str(w.message).split(" moved to ")[0] for w in caught if " moved to " in str(w.message)})
print("moved:", ",".join(moved))
assert issubclass(cls, DatasetPlugin), cls.__mro__
splits = cls().read(data, SplitConfig(val_fraction=0.25, test_fraction=0.25))
print("rows:", sum(len(t) for t in splits.values()))
print("splits:", ",".join(sorted(k for k, t in splits.items() if len(t))))
'''


def test_a_plugin_written_against_the_old_paths_loads_and_reads(tmp_path):
    from PIL import Image

    folder = tmp_path / "plugins"
    folder.mkdir()
    (folder / "old_style.py").write_text(OLD_STYLE_PLUGIN)
    data = tmp_path / "data"
    data.mkdir()
    rows = ["image,patient,finding"]
    for i in range(12):
        Image.new("L", (8, 8), color=i * 10).save(data / f"{i}.png")
        rows.append(f"{i}.png,p{i},{i % 2}")
    (data / "labels.csv").write_text("\n".join(rows) + "\n")
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(SCRIPT), str(folder), str(data)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    out = dict(line.split(": ", 1) for line in result.stdout.splitlines())
    assert out["moved"].split(",") == ["arkfed.dataset", "arkfed.label_files", "arkfed.plugins", "arkfed.schema"]
    assert out["rows"] == "12" and out["splits"] == "test,train,val"


def test_old_paths_are_the_new_modules_not_copies():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import arkfed.plugins as old_plugins
        import arkfed.schema as old_schema

        from arkfed.model import ArkModel as OldArkModel
    import arkfed.data.schema
    import arkfed.datasets._plugin
    from arkfed.model.ark import ArkModel

    assert old_plugins is arkfed.datasets._plugin and old_schema is arkfed.data.schema
    assert OldArkModel is ArkModel
