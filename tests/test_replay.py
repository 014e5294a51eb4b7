"""lowbit.models.replay.DecodeReplay (decode steps as bound native calls) against the eager
decode path: bitwise the same logits, and bad metadata still raises before any kernel runs."""
import pytest
import torch

import lowbit
from lowbit.models import load_gguf
from lowbit.models.generate import BLOCK_SIZE
from lowbit.models.replay import DecodeReplay
from lowbit.models.synthetic import write_synthetic_gguf
from lowbit.nn.kv_cache import PagedKVCache

VARIANTS = {  # name: (write_synthetic_gguf kwargs, load_gguf kwargs, cache dtype)
    "q4_1": (dict(tensor_type="q4_1"), dict(), None),
    "q4_0_int8_act": (dict(tensor_type="q4_0"), dict(activations="int8"), None),
    "q8_0_fp16_cache": (dict(tensor_type="q8_0", tied=False), dict(), torch.float16),
    "f32": (dict(tensor_type="f32"), dict(), None),
    "f32_w8a8_int8_cache": (dict(tensor_type="f32"), dict(scheme="w8a8"), torch.int8),
    "qwen2_rope_dim": (dict(tensor_type="q4_1", arch="qwen2", head_dim=32, rope_dim=16), dict(), None),
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("replay")
    out = {}
    for name, (wkw, _, _) in VARIANTS.items():
        path = d / f"{name}.gguf"
        write_synthetic_gguf(path, n_layers=2, vocab_size=384, seed=3, **wkw)
        out[name] = path
    return out


def _prefilled(model, prompts, cache_dtype, max_new):
    cfg = model.config
    blocks = sum(-(-(len(p) + max_new) // BLOCK_SIZE) for p in prompts)
    cache = PagedKVCache(cfg.n_layers, blocks, BLOCK_SIZE, cfg.n_kv_heads, cfg.head_dim, cache_dtype=cache_dtype)
    for s, p in enumerate(prompts):
        cache.add(s)
    slots = torch.cat([cache.append(s, len(p)) for s, p in enumerate(prompts)])
    qsl = torch.tensor([0] + torch.tensor([len(p) for p in prompts]).cumsum(0).tolist(), dtype=torch.int32)
    pos = torch.cat([torch.arange(len(p)) for p in prompts])
    logits = model.forward_paged(torch.tensor(sum(prompts, [])), pos, cache, list(range(len(prompts))), qsl, slots)
    return cache, logits.argmax(-1)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_replay_matches_eager_bitwise(files, name):
    _, lkw, cache_dtype = VARIANTS[name]
    model = load_gguf(files[name], **lkw)
    gen = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, 384, (n,), generator=gen).tolist() for n in (5, 17, 30)]  # ragged, cross blocks
    steps = 20
    eager, last_e = _prefilled(model, prompts, cache_dtype, steps)
    replayed, last_r = _prefilled(model, prompts, cache_dtype, steps)
    assert torch.equal(last_e, last_r)
    seqs = [0, 1, 2]
    replay = DecodeReplay(model, replayed, len(seqs), -(-(30 + steps) // BLOCK_SIZE))
    for _ in range(steps):
        pos = torch.tensor([eager.seq_len(s) for s in seqs])
        slots_e = torch.cat([eager.append(s, 1) for s in seqs])
        slots_r = torch.cat([replayed.append(s, 1) for s in seqs])
        want = model.forward_paged(last_e, pos, eager, seqs, None, slots_e)
        got = replay.step(last_r, pos, slots_r, seqs)
        assert torch.equal(got, want), f"{name}: replayed logits differ from eager"
        last_e, last_r = want.argmax(-1), got.argmax(-1)
    for layer in range(model.config.n_layers):
        assert torch.equal(eager.key_caches[layer], replayed.key_caches[layer])
        assert torch.equal(eager.value_caches[layer], replayed.value_caches[layer])


def test_generate_with_and_without_replay(files):
    model = load_gguf(files["q4_1"])
    prompts = [[1, 2, 3], list(range(40, 60)), [7] * 9]
    kw = dict(temperature=0.8, top_k=50, seed=11, stop_tokens=[5, 6, 7, 8])  # some sequences stop early
    a = model.generate(prompts, 24, **kw)
    b = model.generate(prompts, 24, replay=False, **kw)
    assert a.tokens == b.tokens and a.finish_reasons == b.finish_reasons


def test_bad_metadata_raises_before_kernels(files):
    model = load_gguf(files["f32"])
    cache, last = _prefilled(model, [[1, 2, 3]], None, 4)
    replay = DecodeReplay(model, cache, 1, 2)
    slots = cache.append(0, 1)
    cache._tables[0][0] = cache.num_blocks + 5  # a corrupt block table
    with pytest.raises(ValueError, match="block_tables"):
        replay.step(last, torch.tensor([3]), slots, [0])
    cache._tables[0][0] = 0
    with pytest.raises(ValueError, match="slot_mapping"):
        replay.step(last, torch.tensor([3]), torch.tensor([10 ** 6]), [0])
    with pytest.raises(ValueError, match="token ids"):
        replay.step(torch.tensor([10 ** 6]), torch.tensor([3]), slots, [0])
    with pytest.raises(ValueError, match="expected 1 sequences"):
        replay.step(torch.cat([last, last]), torch.tensor([3, 3]), torch.cat([slots, slots]), [0, 0])


def test_bind_checks_buffers():
    lin = lowbit.nn.Int4Linear.from_float(torch.nn.Linear(64, 32))
    x = torch.randn(2, 64)
    with pytest.raises(ValueError, match="y must be"):
        lin.bind(x, torch.empty(2, 31))
    with pytest.raises(ValueError, match="x must be"):
        lin.bind(torch.randn(64, 2).t(), torch.empty(2, 32))
    with pytest.raises(ValueError, match="M >= 1"):  # (the eager call takes it: an empty y)
        lin.bind(torch.empty(0, 64), torch.empty(0, 32))
    y = torch.full((2, 32), float("nan"))
    lin.bind(x, y)()
    torch.testing.assert_close(y, lin(x), rtol=0, atol=0)
    # a module off the CPU (meta here; CUDA alike) is refused: the bound call is a CPU kernel
    for off_cpu in (lowbit.nn.Int4Linear(64, 32, device="meta"), lowbit.nn.Int8Linear(64, 32, device="meta")):
        with pytest.raises(ValueError, match="binds CPU modules only"):
            off_cpu.bind(torch.empty(2, 64, device="meta"), torch.empty(2, 32, device="meta"))


def test_concurrent_generation_matches_serial(files, restore_threads):
    """8 Python threads generating on one shared model (each call has its own cache and replay;
    kernels release the GIL) give the serial results; lowbit.set_num_threads changing meanwhile is
    safe (the split of decode attention across threads follows the count, so only validity is
    checked then)."""
    from conftest import run_concurrently

    model = load_gguf(files["q4_1"])
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 384, (int(n),), generator=gen).tolist() for n in torch.randint(3, 40, (16,), generator=gen)]
    serial = [model.generate([p], 12, stop_tokens=[]).tokens[0] for p in prompts]

    assert run_concurrently(lambda i: model.generate([prompts[i]], 12, stop_tokens=[]).tokens[0],
                            list(range(len(prompts))), 8) == serial

    def changing(i):
        lowbit.set_num_threads(1 + i % 2)
        return model.generate([prompts[i]], 12, stop_tokens=[]).tokens[0]

    for toks in run_concurrently(changing, list(range(len(prompts))), 8):
        assert len(toks) == 12 and all(0 <= t < 384 for t in toks)
