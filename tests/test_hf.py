"""rwkv_torch.hf: the transformers classes against this package's own model (tiny models, CPU, no network)."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

import rwkv_torch as rt  # noqa: E402
from rwkv_torch.checkpoints import to_hf_state_dict  # noqa: E402
from rwkv_torch.hf import RWKVCache, RWKVConfig, RWKVForCausalLM, RWKVTokenizer, register, to_hf  # noqa: E402

V = 97


def tiny(version=7, vocab_size=V, seed=0):
    return rt.build(vocab_size=vocab_size, hidden_size=64, num_layers=2, head_size=16, version=version,
                    seed=seed).eval()


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("version", [4, 5, 6, 7])
def test_logits_hidden_states_embeds_and_loss_equal_the_model(version):
    m = tiny(version)
    hf = to_hf(m).eval()
    ids = torch.randint(0, V, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = m(ids)
        out = hf(ids, labels=ids, output_hidden_states=True)
        by_embeds = hf(inputs_embeds=hf.get_input_embeddings()(ids)).logits
    assert rel(out.logits, want) <= 1e-5
    assert rel(by_embeds, want) <= 1e-5
    assert len(out.hidden_states) == m.config.num_layers + 1
    assert rel(m._head(out.hidden_states[-1]), want) <= 1e-5  # the last one is the last block's output
    ce = torch.nn.functional.cross_entropy(want[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1))
    assert abs(out.loss.item() - ce.item()) <= 1e-5 * ce.item()
    # the cache continues exactly: the state after 6 tokens, then 5 more (through the one-token step too)
    with torch.no_grad():
        c = hf(ids[:, :6], use_cache=True).cache
        assert isinstance(c, RWKVCache) and c.get_seq_length() == 6
        rest = hf(ids[:, 6:10], cache=c).logits
        last = hf(ids[:, 10:], cache=c).logits
    assert c.get_seq_length() == 11
    assert rel(torch.cat([rest, last], 1), want[:, 6:]) <= 1e-5


@pytest.mark.parametrize("version", [4, 7])
def test_left_padded_batch_is_exact_and_greedy_matches_each_row(version):
    hf = to_hf(tiny(version)).eval()
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(1, V, (n,), generator=g).tolist() for n in (3, 7, 1, 5)]
    T = max(map(len, prompts))
    ids = torch.tensor([[0] * (T - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        logits = hf(ids, attention_mask=mask).logits
        for i, p in enumerate(prompts):  # a padded position leaves the state unchanged: real positions are exact
            alone = hf(torch.tensor([p])).logits[0]
            assert rel(logits[i, T - len(p):], alone) <= 1e-5
    batch = hf.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    for i, p in enumerate(prompts):
        own = hf.generate(torch.tensor([p]), max_new_tokens=8, do_sample=False, pad_token_id=0)
        assert batch[i, T:].tolist() == own[0, len(p):].tolist()


def test_generate_prefills_once_then_steps_and_equals_no_cache():
    hf = to_hf(tiny(6)).eval()
    lengths = []
    hook = hf.register_forward_pre_hook(lambda mod, args, kw: lengths.append(kw["input_ids"].shape[1]),
                                        with_kwargs=True)
    ids = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(3))
    cached = hf.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert lengths == [9] + [1] * 5
    lengths.clear()
    plain = hf.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0, use_cache=False)
    assert lengths == list(range(9, 15))
    hook.remove()
    assert torch.equal(cached, plain)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # beam search reorders the state rows (RWKVCache.reorder_cache)
    kw = dict(attention_mask=mask, max_new_tokens=5, num_beams=3, do_sample=False, pad_token_id=0)
    assert torch.equal(hf.generate(ids, **kw), hf.generate(ids, use_cache=False, **kw))


def test_training_with_right_padding_is_exact_and_checkpointing_keeps_the_gradient():
    m = rt.build(vocab_size=V, hidden_size=64, num_layers=2, head_size=16, version=7, seed=0)
    hf = to_hf(m).train()
    ids = torch.randint(0, V, (2, 10), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # a collator's right padding
    labels = ids.masked_fill(mask == 0, -100)
    out = hf(ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    grads = lambda: torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None])  # noqa: E731
    grad = grads().clone()
    assert grad.abs().max() > 0
    assert rel(out.logits[1, :7], hf(ids[1:, :7]).logits[0]) <= 1e-5
    hf.zero_grad()
    (getattr(hf, "activation_checkpointing_enable", None) or hf.gradient_checkpointing_enable)()  # 5.x / 4.x name
    assert m.gradient_checkpointing
    hf(ids, attention_mask=mask, labels=labels).loss.backward()
    assert rel(grads(), grad) <= 1e-5


def test_save_pretrained_from_pretrained_and_auto_classes(tmp_path):
    register()
    m = tiny(5, vocab_size=256)
    hf = to_hf(m).eval()
    hf.save_pretrained(tmp_path)
    RWKVTokenizer(kind="byte").save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    cfg = transformers.AutoConfig.from_pretrained(tmp_path)
    assert isinstance(cfg, RWKVConfig) and cfg.model_type == "rwkv_torch" and cfg.core() == m.config
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert isinstance(back, RWKVForCausalLM) and isinstance(tok, RWKVTokenizer) and tok.kind == "byte"
    ids = torch.tensor([tok.encode("héllo")])
    with torch.no_grad():
        assert torch.equal(back(ids).logits, hf(ids).logits)


def test_convert_cli_format_hf(tmp_path):
    from rwkv_torch import cli
    from rwkv_torch.checkpoints import save_official

    m = tiny(7, vocab_size=256)
    save_official(m, tmp_path / "m.pth")
    assert cli.main(["convert", str(tmp_path / "m.pth"), str(tmp_path / "out"), "--format", "hf"]) in (0, None)
    register()
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    ids = torch.randint(0, 256, (1, 5))
    with torch.no_grad():
        assert rel(back(ids).logits, m(ids)) <= 1e-5


def test_text_generation_pipeline():
    hf = to_hf(tiny(7, vocab_size=256)).eval()
    pipe = transformers.pipeline("text-generation", model=hf, tokenizer=RWKVTokenizer(kind="byte"), device="cpu")
    out = pipe("Hello", max_new_tokens=5, do_sample=False)
    text = out[0]["generated_text"]
    assert text.startswith("Hello")
    want = hf.generate(torch.tensor([list(b"Hello")]), max_new_tokens=5, do_sample=False)
    assert text.encode("utf-8", errors="replace") == RWKVTokenizer(kind="byte").decode(want[0]).encode(
        "utf-8", errors="replace")


def test_world_tokenizer_wraps_the_package_tokenizer(tmp_path):
    pytest.importorskip("rwkv")
    from rwkv_torch.tokenizer import WorldTokenizer

    tok = RWKVTokenizer()
    text = "Hello wörld 你好"
    assert tok(text)["input_ids"] == WorldTokenizer().encode(text)
    assert tok.decode(tok(text)["input_ids"]) == text and tok.eos_token_id == tok.pad_token_id == 0
    tok.save_pretrained(tmp_path)
    assert RWKVTokenizer.from_pretrained(tmp_path)(text)["input_ids"] == tok(text)["input_ids"]
    batch = tok(["a b c", "hello"], padding=True)
    assert batch["attention_mask"][1][0] == 0  # left padding, what generate needs


def test_peft_lora_through_trainer_lowers_the_loss_and_merges(tmp_path):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    hf = to_hf(tiny(7, vocab_size=256))
    data = [torch.tensor(list(b"abcabcabcabcabcabcab"[i % 3:][:16])) for i in range(24)]

    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return len(data)

        def __getitem__(self, i):
            return {"input_ids": data[i], "labels": data[i]}

    def loss_now(model):
        with torch.no_grad():
            x = torch.stack(data)
            return model(input_ids=x, labels=x).loss.item()

    lora = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["key", "value", "receptance",
                                                                                       "output"]))
    before = loss_now(lora.eval())
    prompt = torch.tensor([list(b"abca")])
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    hf.generate(prompt, **kw)  # builds the decode weights of the one-token step: training must make them stale
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=30, per_device_train_batch_size=8,
                                          learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True,
                                          logging_steps=10, disable_tqdm=True, dataloader_num_workers=0)
    transformers.Trainer(model=lora, args=args, train_dataset=DS()).train()
    lora.eval()
    after = loss_now(lora)
    assert after < before - 0.1
    x = torch.stack(data[:2])
    with torch.no_grad():
        adapted = lora(input_ids=x).logits
    generated = lora.generate(input_ids=prompt, **kw)
    assert torch.equal(generated, lora.generate(input_ids=prompt, use_cache=False, **kw))
    merged = lora.merge_and_unload()
    assert torch.equal(merged.generate(prompt, **kw), generated)
    assert isinstance(merged, RWKVForCausalLM)
    assert all(type(b.att.key) is torch.nn.Linear for b in merged.rwkv.blocks)
    with torch.no_grad():
        assert rel(merged(input_ids=x).logits, adapted) <= 1e-5
        assert rel(merged.rwkv(x), adapted) <= 1e-5  # the merged weights are a plain rwkv_torch model


def test_rwkv4_matches_transformers_rwkv(tmp_path):
    m = tiny(4)
    c = m.config
    ref = transformers.RwkvForCausalLM(transformers.RwkvConfig(
        vocab_size=V, hidden_size=c.hidden_size, num_hidden_layers=c.num_layers, attention_hidden_size=c.hidden_size,
        intermediate_size=c.ffn_dim, rescale_every=0, tie_word_embeddings=False)).eval()
    missing, unexpected = ref.load_state_dict(to_hf_state_dict(m), strict=False)
    assert not unexpected and not missing
    hf = to_hf(m).eval()
    ids = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert rel(hf(ids).logits, ref(ids).logits) <= 1e-5
    ours = hf.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    theirs = ref.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(ours, theirs)
