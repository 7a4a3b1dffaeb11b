import pytest
import torch

import rwkv_torch as rt
from rwkv_torch import cli
from rwkv_torch.checkpoints import save_official
from rwkv_torch.generate import full_state, generate, logits_to_probs, sample, stream, stream_text
from rwkv_torch.tokenizer import get_tokenizer

PROMPT = list(b"Hello, RWKV")


@pytest.fixture(scope="module")
def model():
    return rt.build(version=7, vocab_size=256, hidden_size=64, num_layers=2, head_size=16, seed=0).eval()


def _states_equal(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.tensors().values(), b.tensors().values()))


def test_sampling_functions():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0], [0.0, 0.0, 5.0, 1.0]])
    assert sample(logits, temperature=0).tolist() == [1, 2]
    p = logits_to_probs(logits, top_k=2)
    assert (p > 0).sum(-1).tolist() == [2, 2] and p[0, 1] > p[0, 2] > 0 and p[0, 0] == 0
    torch.testing.assert_close(p.sum(-1), torch.ones(2))
    # top_p: row 0 probs ~ [.087, .644, .237, .032]; the top two hold .881 >= .85, so only they survive.
    p = logits_to_probs(logits, top_p=0.85)
    assert (p[0] > 0).tolist() == [False, True, True, False]
    assert (p[1] > 0).sum() == 1  # token 2 alone holds > 0.85
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample(logits, temperature=1.0, generator=g) for _ in range(4000)])
    freq = (draws[:, 0, None] == torch.arange(4)).float().mean(0)
    torch.testing.assert_close(freq, torch.softmax(logits[0], -1), atol=0.03, rtol=0)


def test_greedy_matches_full_forward(model):
    out = generate(model, PROMPT, max_tokens=12, temperature=0)
    seq = list(PROMPT)
    with torch.no_grad():
        for _ in range(12):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert out.tokens == [seq[len(PROMPT):]]
    assert out.pending == [[seq[-1]]] and out.stopped == [False]


def test_seeded_sampling_is_reproducible(model):
    opts = dict(max_tokens=16, temperature=1.0, top_p=0.9)
    a = generate(model, PROMPT, seed=1, **opts)
    b = generate(model, PROMPT, seed=torch.Generator().manual_seed(1), **opts)
    c = generate(model, PROMPT, seed=2, **opts)
    assert a.tokens == b.tokens and _states_equal(a.state, b.state)
    assert a.tokens != c.tokens


def test_top_k_1_is_greedy(model):
    greedy = generate(model, PROMPT, max_tokens=16, temperature=0)
    assert generate(model, PROMPT, max_tokens=16, temperature=1.5, top_k=1, seed=3).tokens == greedy.tokens


def _official_penalty_loop(model, prompt, n, presence, frequency, decay):
    """The rwkv package's PIPELINE.generate bookkeeping (every token weighs 1), greedy."""
    state, occurrence, out = None, {}, []
    with torch.no_grad():
        for t in prompt[:-1]:
            _, state = model.step(torch.tensor([t]), state)
        token = prompt[-1]
        for _ in range(n):
            logits, state = model.step(torch.tensor([token]), state)
            logits = logits[0].double()
            for t, count in occurrence.items():
                logits[t] -= presence + count * frequency
            token = int(logits.argmax())
            out.append(token)
            for t in occurrence:
                occurrence[t] *= decay
            occurrence[token] = occurrence.get(token, 0) + 1
    return out


def test_penalties(model):
    plain = generate(model, PROMPT, max_tokens=40, temperature=0).tokens[0]
    assert len(set(plain)) < 30  # a random model's greedy output falls into a loop
    opts = dict(presence_penalty=0.1, frequency_penalty=1.0, penalty_decay=0.5)
    pen = generate(model, PROMPT, max_tokens=40, temperature=0, **opts).tokens[0]
    assert pen != plain
    assert pen == _official_penalty_loop(model, PROMPT, 40, 0.1, 1.0, 0.5)
    assert len(set(generate(model, PROMPT, max_tokens=40, temperature=0, presence_penalty=1e3).tokens[0])) == 40


def test_stop_tokens(model):
    greedy = generate(model, PROMPT, max_tokens=20, temperature=0).tokens[0]
    i = 5
    stop = greedy[i]
    out = generate(model, PROMPT, max_tokens=20, temperature=0, stop_tokens=[stop, 255 if stop != 255 else 254])
    first = greedy.index(stop)
    assert out.tokens == [greedy[:first]] and out.stopped == [True] and out.pending == [[stop]]
    assert generate(model, PROMPT, max_tokens=first, temperature=0).pending == [[greedy[first - 1]]]


def test_batched_equals_per_row(model):
    prompts = [list(b"a"), list(b"The quick brown fox"), list(b"RWKV-7 Goose")]
    opts = dict(max_tokens=14, temperature=0, presence_penalty=0.2, frequency_penalty=0.3, penalty_decay=0.95)
    singles = [generate(model, p, **opts) for p in prompts]
    stop = singles[1].tokens[0][4]  # row 1 stops early; the other rows must go on unaffected
    singles[1] = generate(model, prompts[1], stop_tokens=[stop], **opts)
    batch = generate(model, prompts, stop_tokens=[stop], **opts)
    assert batch.state.batch_size == 3
    for b, single in enumerate(singles):
        assert batch.tokens[b] == single.tokens[0], f"row {b}"
        assert batch.stopped[b] == single.stopped[0] and batch.pending[b] == single.pending[0]
        for k, v in batch.state.select(b).tensors().items():
            torch.testing.assert_close(v, single.state.tensors()[k], rtol=1e-5, atol=1e-6, msg=f"row {b} {k}")
    assert batch.stopped[1] and len(batch.tokens[1]) < 14 <= len(batch.tokens[0])


def test_batched_resume(model):
    prompts = [list(b"ab"), list(b"The quick brown fox")]
    full = generate(model, prompts, max_tokens=10, temperature=0)
    first = generate(model, prompts, max_tokens=4, temperature=0)
    rest = generate(model, first.pending, state=first.state, max_tokens=6, temperature=0)
    assert [a + b for a, b in zip(first.tokens, rest.tokens)] == full.tokens
    assert _states_equal(rest.state, full.state)


def test_stream_yields_per_step(model):
    it = stream(model, [PROMPT, PROMPT[:3]], max_tokens=5, temperature=0)
    steps = list(it)
    assert len(steps) == 5 and all(len(s) == 2 and None not in s for s in steps)


@pytest.mark.parametrize("mode", ["greedy", "sampled"])
def test_resume_from_saved_state_is_bit_identical(model, tmp_path, mode):
    opts = dict(temperature=0) if mode == "greedy" else dict(temperature=1.0, top_p=0.95, top_k=50)
    full = generate(model, PROMPT, max_tokens=20, seed=torch.Generator().manual_seed(7), **opts)
    g = torch.Generator().manual_seed(7)
    first = generate(model, PROMPT, max_tokens=8, seed=g, **opts)
    first.state.save(tmp_path / "mid.safetensors")
    state = rt.RWKVState.load(tmp_path / "mid.safetensors")
    rest = generate(model, first.pending, state=state, max_tokens=12, seed=g, **opts)
    assert first.tokens[0] + rest.tokens[0] == full.tokens[0]
    assert _states_equal(rest.state, full.state)

    # Save right after the prompt, resume later with the same seed: the same output as one uninterrupted call.
    after_prompt = generate(model, PROMPT, max_tokens=0)
    assert after_prompt.tokens == [[]] and after_prompt.pending == [PROMPT[-1:]]
    after_prompt.state.save(tmp_path / "prompt.safetensors")
    resumed = generate(model, after_prompt.pending, state=rt.RWKVState.load(tmp_path / "prompt.safetensors"),
                       max_tokens=20, seed=7, **opts)
    again = generate(model, PROMPT, max_tokens=20, seed=7, **opts)
    assert resumed.tokens == again.tokens and _states_equal(resumed.state, again.state)


def test_fork_two_continuations(model, tmp_path):
    path = tmp_path / "fork.safetensors"
    full_state(model, generate(model, PROMPT, max_tokens=0)).save(path)
    state = rt.RWKVState.load(path)
    a = generate(model, list(b" yes"), state=state, max_tokens=12, seed=1)
    b = generate(model, list(b" yes"), state=state, max_tokens=12, seed=2)
    a2 = generate(model, list(b" yes"), state=state, max_tokens=12, seed=1)  # the shared state was not mutated
    assert a.tokens == a2.tokens and a.tokens != b.tokens and _states_equal(a.state, a2.state)
    yes = generate(model, list(b" yes"), state=state, max_tokens=12, temperature=0)
    no = generate(model, list(b" no"), state=state, max_tokens=12, temperature=0)
    assert yes.tokens != no.tokens
    # Feeding the prompt then " yes" in one call yields the same (greedy) text as forking from the saved state.
    direct = generate(model, PROMPT + list(b" yes"), max_tokens=12, temperature=0)
    assert yes.tokens == direct.tokens


def test_state_file_checks(model, tmp_path):
    path = tmp_path / "s.safetensors"
    generate(model, PROMPT, max_tokens=0).state.save(path)
    other = rt.build(version=7, vocab_size=256, hidden_size=32, num_layers=2, head_size=16, seed=0).eval()
    with pytest.raises(ValueError, match="state belongs to a model with"):
        generate(other, [1], state=rt.RWKVState.load(path), max_tokens=1)
    with pytest.raises(ValueError, match="batch size 1"):
        generate(model, [[1], [2]], state=rt.RWKVState.load(path), max_tokens=1)
    from safetensors.torch import load_file, save_file

    save_file(load_file(path), path, metadata={"format": "rwkv-torch-state", "format_version": "99", "model": "{}"})
    with pytest.raises(ValueError, match="version 99 is newer"):
        rt.RWKVState.load(path)


def test_input_errors(model):
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[1, 2], []])
    with pytest.raises(ValueError, match=r"\[0, 256\)"):
        generate(model, [1, 300])
    with pytest.raises(ValueError, match="top_p"):
        generate(model, [1], top_p=0)
    with pytest.raises(TypeError, match="token model"):
        generate(rt.build(embed_dim=8, hidden_size=32, num_layers=1, head_size=16), [1])


def test_stream_text(model):
    tok = get_tokenizer("byte")
    it = stream_text(model, tok, "Hi there", max_tokens=24, seed=0)
    pieces = []
    while True:
        try:
            pieces.append(next(it))
        except StopIteration as e:
            result = e.value
            break
    assert all(pieces) and "".join(pieces) == tok.decode(result.tokens[0])
    assert len(result.tokens[0]) == 24


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    return rt.save(model, d / "lm"), save_official(model, d / "lm.pth")


def test_cli_generate_matches_library(model, saved, capsys):
    native, official = saved
    tok = get_tokenizer("byte")
    ref = generate(model, tok.encode("Once"), max_tokens=20, temperature=0, presence_penalty=0.2,
                   frequency_penalty=0.2, penalty_decay=0.996)
    for path in (native, official):
        assert cli.main(["generate", "--model", str(path), "--prompt", "Once", "--max-tokens", "20",
                         "--temperature", "0"]) == 0
        assert capsys.readouterr().out == tok.decode(ref.tokens[0]) + "\n"
    args = ["generate", "--model", str(native), "--prompt", "Once", "--max-tokens", "16", "--seed", "5",
            "--top-k", "40", "--top-p", "0.9", "--presence-penalty", "0.5", "--frequency-penalty", "0.1"]
    assert cli.main(args) == 0
    first = capsys.readouterr().out
    assert cli.main(args) == 0 and capsys.readouterr().out == first


def test_cli_state_in_out(model, saved, tmp_path, capsys):
    native, _ = saved
    s = tmp_path / "chat.safetensors"
    assert cli.main(["generate", "--model", str(native), "--prompt", "User: hi", "--max-tokens", "0",
                     "--state-out", str(s)]) == 0
    assert capsys.readouterr().out == "\n"
    tok = get_tokenizer("byte")
    expected = generate(model, tok.encode("\nBot:"), state=full_state(model, generate(model, tok.encode("User: hi"),
                        max_tokens=0)), max_tokens=12, temperature=0, presence_penalty=0.2, frequency_penalty=0.2,
                        penalty_decay=0.996)
    args = ["generate", "--model", str(native), "--prompt", "\nBot:", "--max-tokens", "12", "--temperature", "0",
            "--state-in", str(s)]
    for _ in range(2):  # two continuations (forks) of one state file
        assert cli.main(args) == 0
        assert capsys.readouterr().out == tok.decode(expected.tokens[0]) + "\n"
    other = rt.save(rt.build(version=7, vocab_size=256, hidden_size=32, num_layers=1, head_size=16), tmp_path / "o")
    assert cli.main(["generate", "--model", str(other), "--prompt", "x", "--state-in", str(s)]) == 2
    assert "state belongs to a model" in capsys.readouterr().err


def test_cli_tokenizer_choice(tmp_path, capsys):
    odd = rt.save(rt.build(version=7, vocab_size=300, hidden_size=32, num_layers=1, head_size=16), tmp_path / "odd")
    assert cli.main(["generate", "--model", str(odd), "--prompt", "x"]) == 2
    assert "--tokenizer" in capsys.readouterr().err
    assert cli.main(["generate", "--model", str(odd), "--prompt", "x", "--tokenizer", "byte"]) == 2
    assert "larger than the byte tokenizer" in capsys.readouterr().err


def test_cli_info_and_convert(model, saved, tmp_path, capsys):
    native, official = saved
    assert cli.main(["info", str(official)]) == 0
    out = capsys.readouterr().out
    assert "RWKV-7" in out and f"params: {model.param_count():,}" in out and "dtype: float32" in out
    assert "hidden_size: 64" in out and "vocab_size: 256" in out
    assert cli.main(["convert", str(official), str(tmp_path / "conv")]) == 0
    assert cli.main(["convert", str(tmp_path / "conv"), str(tmp_path / "back.pth")]) == 0
    assert cli.main(["convert", str(native), str(tmp_path / "half"), "--dtype", "bf16"]) == 0
    capsys.readouterr()
    ref = model.state_dict()
    for path in (tmp_path / "conv", tmp_path / "back.pth"):
        sd = rt.load(path).state_dict()
        assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in ref), path
    assert torch.load(tmp_path / "back.pth", weights_only=True).keys() == torch.load(official, weights_only=True).keys()
    assert next(rt.load(tmp_path / "half").parameters()).dtype == torch.bfloat16
    assert cli.main(["info", str(tmp_path / "missing")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_state_file_that_is_not_one_names_the_file(model, tmp_path, saved, capsys):
    good = tmp_path / "s.safetensors"
    generate(model, PROMPT, max_tokens=0).state.save(good)
    data = good.read_bytes()
    bad = {"empty": b"", "junk": b"not a safetensors file at all", "truncated": data[:len(data) // 2]}
    for name, content in bad.items():
        (tmp_path / name).write_bytes(content)
    (tmp_path / "folder").mkdir()
    for name in [*bad, "folder"]:
        with pytest.raises(ValueError, match=name):
            rt.RWKVState.load(tmp_path / name)
        assert cli.main(["generate", "--model", str(saved[0]), "--prompt", "x", "--state-in",
                         str(tmp_path / name)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"rwkv-torch generate: error: {tmp_path / name}") and err.count("\n") == 1, err


def test_cli_generate_mistakes_are_refused_before_generating(saved, tmp_path, capsys):
    native, _ = saved
    base = ["generate", "--model", str(native), "--prompt", "x", "--max-tokens", "5"]
    cases = {("--state-out", str(tmp_path / "missing" / "s.safetensors")): "does not exist",
             ("--state-out", str(tmp_path)): "is a directory",
             ("--device", "tpu"): "--device 'tpu' is not a device",
             ("--device", "cuda:99"): "--device cuda:99",
             ("--tokenizer", "world"): "vocab_size 256 is smaller than the world tokenizer's 65536"}
    for flags, message in cases.items():
        assert cli.main(base + list(flags)) == 2, flags
        out, err = capsys.readouterr()
        assert out == "" and message in err and err.count("\n") == 1, (flags, err)  # nothing generated


def test_cli_convert_refuses_to_overwrite_a_model(saved, tmp_path, capsys):
    native, official = saved
    dst = tmp_path / "run"
    assert cli.main(["convert", str(official), str(dst)]) == 0
    before = (dst / "model.safetensors").read_bytes()
    assert cli.main(["convert", str(native), str(dst), "--dtype", "bf16"]) == 2
    assert "already holds a model" in capsys.readouterr().err and (dst / "model.safetensors").read_bytes() == before
    assert cli.main(["convert", str(native), str(dst), "--dtype", "bf16", "--overwrite"]) == 0
    assert next(rt.load(dst).parameters()).dtype == torch.bfloat16
    back = tmp_path / "back.pth"
    assert cli.main(["convert", str(dst), str(back)]) == 0
    assert cli.main(["convert", str(native), str(back)]) == 2 and "--overwrite" in capsys.readouterr().err
