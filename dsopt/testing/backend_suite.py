"""The models onnx ships for its backend tests, with the inputs its own runner feeds them.

Used by the peer-suite test and the peer-suite benchmark: every model under
`onnx/backend/test/data/` of the installed onnx wheel (`light/*.onnx`, and the `model.onnx` +
`test_data_set_0` folders of `pytorch-converted`, `pytorch-operator` and `simple`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import onnx
from onnx.backend.test.runner import Runner

from dsopt import numerics

__all__ = ["DATA", "FOLDER_KINDS", "Case", "discover"]

DATA = Path(onnx.__file__).parent / "backend" / "test" / "data"
FOLDER_KINDS = ("pytorch-converted", "pytorch-operator", "simple")


@dataclasses.dataclass(frozen=True)
class Case:
    """One backend-test model: where it is and where its inputs are (None: runner dummy data)."""

    kind: str
    name: str
    model: Path
    data: Path | None

    def inputs(self) -> list[numerics.Feeds]:
        """The sample(s) the onnx backend runner feeds this model.

        Light models ship no inputs: they get `Runner.generate_dummy_data(x, random=False)`
        (declared shape, unknown dims as 1, values `arange(n) / n`), the inputs their shipped
        `light_*_output_0.pb` files were made from.
        """
        if self.data is not None:
            return numerics.load_inputs(self.data, self.model)
        proto = onnx.load(self.model, load_external_data=False)
        weights = {t.name for t in proto.graph.initializer}
        return [
            {
                x.name: Runner.generate_dummy_data(x, seed=0, name=self.name, random=False)
                for x in proto.graph.input
                if x.name not in weights
            }
        ]


def discover() -> list[Case]:
    """Every backend-test case of the installed onnx wheel, light models first."""
    cases = [Case("light", p.stem, p, None) for p in sorted((DATA / "light").glob("*.onnx"))]
    for kind in FOLDER_KINDS:
        for folder in sorted(p for p in (DATA / kind).iterdir() if p.is_dir()):
            cases.append(Case(kind, folder.name, folder / "model.onnx", folder / "test_data_set_0"))
    return cases
