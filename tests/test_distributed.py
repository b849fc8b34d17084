"""Data-parallel corpus statistics: torchrun with 2 gloo processes on CPU equals one process exactly."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

from xlkernels.analysis import neurons as N


def test_shards_partition_the_batches():
    from xlkernels.models import tiny_tokenizer
    tok = tiny_tokenizer()
    corpus = {"a": ["x" * i for i in range(1, 8)], "b": ["y" * i for i in range(1, 6)]}
    one = [g for _, _, g in N.text_batches(tok, corpus, 3, 16)]
    r0 = [g for _, _, g in N.text_batches(tok, corpus, 3, 16, shard=(0, 2))]
    r1 = [g for _, _, g in N.text_batches(tok, corpus, 3, 16, shard=(1, 2))]
    assert len(one) == 4 and len(r0) == 2 and len(r1) == 2
    assert all(torch.equal(a, b) for a, b in zip(one, [r0[0], r1[0], r0[1], r1[1]]))


def test_torchrun_two_ranks_equal_single_process(tmp_path):
    import xlkernels
    from xlkernels.analysis.data import parallel_corpus
    from xlkernels.models import tiny_model
    out = tmp_path / "stats.safetensors"
    model, tok = tiny_model("llama")
    tok.save_pretrained(tmp_path / "tok")   # the ranks use this very tokenizer
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    cmd = [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "xlkernels.analysis.neurons.distributed",
           "--tiny", "llama", "--langs", "en,de,fr", "--num-texts", "7", "--batch-size", "4", "--max-length", "32",
           "--tokenizer", str(tmp_path / "tok"), "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    got = xlkernels.NeuronStats.load(str(out))
    want = N.collect_stats(model, tok, parallel_corpus(["en", "de", "fr"], 7), batch_size=4, max_length=32,
                           progress=False)
    assert torch.equal(got.tokens, want.tokens) and int(want.tokens.min()) > 0
    assert torch.equal(got.positive, want.positive)
    assert torch.equal(got.max, want.max)
    assert torch.allclose(got.sum, want.sum, rtol=1e-12, atol=1e-12)
    assert torch.allclose(got.sum_sq, want.sum_sq, rtol=1e-12, atol=1e-12)


def test_needs_process_group():
    from xlkernels.analysis.neurons.distributed import collect_stats_distributed
    with pytest.raises(RuntimeError, match="torch.distributed"):
        collect_stats_distributed(None, None, {"en": ["x"]})
