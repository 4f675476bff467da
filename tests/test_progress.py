"""One progress line from the first second: the total is known before the first layer, and
it moves with every calibration batch and reconstruction step inside the first layer."""

import dass
import dass.run.progress as progress_mod
from tiny import calib, tiny_model


class Recorder:
    """Stands in for tqdm: records the total, every description and every update."""

    instances: list["Recorder"] = []

    def __init__(self, total=None, desc="", **_):
        self.total, self.events = total, [("desc", desc)]
        Recorder.instances.append(self)

    def set_description_str(self, desc, refresh=True):
        self.events.append(("desc", desc))

    def update(self, n=1):
        self.events.append(("update", n))

    def close(self):
        self.events.append(("close", None))


def test_progress_counts_batches_and_steps_from_the_first_layer(monkeypatch):
    monkeypatch.setattr(progress_mod, "tqdm", Recorder)
    Recorder.instances.clear()
    dass.prune(tiny_model("llama"), "wanda", "2:4", calibration=calib(6, 24), batch_size=3, progress=True,
               reconstruct="steps=5,batch_tokens=32")
    (bar,) = Recorder.instances
    # 2 layers x (2 batches observed + 2 propagated + 5 reconstruction steps), known at the start
    assert bar.total == 2 * (2 + 2 + 5)
    assert bar.events[0] == ("desc", "wanda 2:4 layer 1/2 start")
    first_layer = []
    for kind, value in bar.events[1:]:
        if kind == "desc" and "layer 2/2" in value:
            break
        first_layer.append((kind, value))
    phases = [v for k, v in first_layer if k == "desc"]
    assert phases == [f"wanda 2:4 layer 1/2 {p}" for p in ("statistics", "pruning", "reconstruction", "propagation")]
    assert sum(v for k, v in first_layer if k == "update") == 9  # every unit of layer 1 before layer 2 starts
    assert sum(v for k, v in bar.events if k == "update") == bar.total
    assert bar.events[-1] == ("close", None)


def test_no_progress_when_asked(monkeypatch):
    monkeypatch.setattr(progress_mod, "tqdm", Recorder)
    Recorder.instances.clear()
    dass.prune(tiny_model("llama"), "wanda", "2:4", calibration=calib(4, 16), progress=False)
    assert Recorder.instances == []
