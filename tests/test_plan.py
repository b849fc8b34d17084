"""SteeringPlan (xlkernels.analysis.plan): safetensors + JSON round trip, validation, apply."""
import json

import pytest
import torch

from xlkernels.analysis.steering.plan import SteeringPlan, model_dims

L, H, D, I = 2, 4, 16, 128
META = {"model": "tiny", "arch": "llama", "num_layers": L, "num_heads": H, "head_dim": D, "num_neurons": I}


def _plan(bank=True):
    shift = torch.randn(3, L, H, D) if bank else torch.randn(L, H, D)
    return SteeringPlan(gate=torch.rand(L, H), shift=shift, alpha=2.5,
                        neurons={1: torch.tensor([3, 7, 100])}, languages=["en", "de", "fr"] if bank else [],
                        meta=dict(META))


@pytest.mark.parametrize("where", ["dir", "file"])
def test_roundtrip(tmp_path, where):
    p = _plan()
    target = tmp_path / "out" if where == "dir" else tmp_path / "my.safetensors"
    st = p.save(target)
    assert st.exists() and st.with_suffix(".json").exists()
    q = SteeringPlan.load(target)
    assert torch.equal(q.gate, p.gate) and torch.equal(q.shift, p.shift)
    assert q.alpha == 2.5 and q.languages == ["en", "de", "fr"]
    assert list(q.neurons) == [1] and q.neurons[1].tolist() == [3, 7, 100] and q.neurons[1].dtype == torch.long
    assert q.meta == META
    js = json.loads(st.with_suffix(".json").read_text())
    assert js["format"] == "xlkernels-steering-plan" and js["shift"] == "bank" and js["num_heads"] == H
    assert SteeringPlan.load(st.with_suffix(".json")).alpha == 2.5      # either file name works


def test_file_is_safetensors_not_pickle(tmp_path):
    st = _plan(bank=False).save(tmp_path / "p.safetensors")
    raw = st.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    assert set(header) == {"__metadata__", "gate", "shift", "neurons.1"}
    assert b"\x80\x04" not in raw[:2]                                   # no pickle protocol header


def test_optional_fields(tmp_path):
    p = SteeringPlan(gate=None, shift=None, neurons={0: torch.tensor([1])}, meta=dict(META))
    q = SteeringPlan.load(p.save(tmp_path / "n"))
    assert q.gate is None and q.shift is None and q.neurons[0].tolist() == [1]


class FakeModel:
    def __init__(self, **kw):
        d = dict(num_layers=L, num_heads=H, head_dim=D, num_neurons=I)
        d.update(kw)
        self.__dict__.update(d)


@pytest.mark.parametrize("kw,match", [({"num_layers": 3}, "num_layers=2"), ({"num_heads": 8}, "num_heads=4"),
                                      ({"head_dim": 8}, "head_dim=16"), ({"num_neurons": 64}, "num_neurons")])
def test_load_checks_model(tmp_path, kw, match):
    st = _plan().save(tmp_path / "p")
    SteeringPlan.load(st, model=FakeModel())
    with pytest.raises(ValueError, match=match):
        SteeringPlan.load(st, model=FakeModel(**kw))


def test_validate_errors(tmp_path):
    with pytest.raises(ValueError, match="gate"):
        SteeringPlan(gate=torch.rand(3, H), meta=dict(META)).validate()
    with pytest.raises(ValueError, match="shift"):
        SteeringPlan(shift=torch.rand(L, H, D + 1), meta=dict(META)).validate()
    with pytest.raises(ValueError, match="languages"):
        SteeringPlan(shift=torch.rand(2, L, H, D), languages=["en"], meta=dict(META)).validate()
    with pytest.raises(ValueError, match=r"neurons\[1\]"):
        SteeringPlan(neurons={1: torch.tensor([I])}, meta=dict(META)).validate()
    with pytest.raises(ValueError, match="layer 5"):
        SteeringPlan(neurons={5: torch.tensor([1])}, meta=dict(META)).validate()
    with pytest.raises(TypeError, match="gate"):
        SteeringPlan(gate=torch.ones(L, H, dtype=torch.long), meta=dict(META)).validate()
    # a plan without dims in its metadata is checked against the model at load time
    st = SteeringPlan(gate=torch.rand(L, H)).save(tmp_path / "nometa")
    with pytest.raises(ValueError, match="gate"):
        SteeringPlan.load(st, model=FakeModel(num_heads=5))
    with pytest.raises(FileNotFoundError):
        SteeringPlan.load(tmp_path / "missing")
    with pytest.raises(ValueError, match="path"):
        SteeringPlan().save(tmp_path / "x.txt")


def test_not_a_plan(tmp_path):
    from safetensors.torch import save_file
    save_file({"a": torch.ones(2)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ValueError, match="not an xlkernels steering plan"):
        SteeringPlan.load(tmp_path / "x.safetensors")


def test_model_dims_from_hf_config():
    from xlkernels.models import tiny_model
    model, _ = tiny_model("llama")
    assert model_dims(model) == {"num_layers": 2, "num_heads": 4, "head_dim": 16, "num_neurons": 128,
                                 "hidden_size": 64}
    import xlkernels
    assert model_dims(xlkernels.patch(model)) == model_dims(model)
    xlkernels.unpatch(model)


def test_apply_to_steerer(tmp_path):
    import xlkernels
    from xlkernels.models import tiny_model
    model, tok = tiny_model("llama")
    st = xlkernels.patch(model)
    try:
        p = SteeringPlan.load(_plan().save(tmp_path / "p"), model=st)
        ids = torch.tensor([tok("Hello")["input_ids"]] * 2)
        p.apply(st, target=["fr", "de"])
        with torch.no_grad():
            got = model(input_ids=ids).logits
        st.reset()
        st.gate = p.gate.clone()
        with torch.no_grad():
            want = []
            for b, row in enumerate([2, 1]):
                st.shift = 2.5 * p.shift[row]
                st.deactivate_neurons(p.neurons)
                want.append(model(input_ids=ids[b:b + 1]).logits[0])
        torch.testing.assert_close(got, torch.stack(want), rtol=1e-5, atol=1e-5)
        st.reset()
        with pytest.raises(ValueError, match="target"):
            p.apply(st)
        with pytest.raises(ValueError, match="target"):
            p.apply(st, target="xx")
        one = SteeringPlan(shift=torch.randn(L, H, D), alpha=0.5, meta=dict(META))
        one.apply(st)
        torch.testing.assert_close(st.shift, 0.5 * one.shift)
        with pytest.raises(ValueError, match="num_heads"):
            SteeringPlan(gate=torch.rand(L, 5), meta={**META, "num_heads": 5}).apply(st)
    finally:
        xlkernels.unpatch(model)
