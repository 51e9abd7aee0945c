import pytest
import torch

from srlm.data.chat import encode_prompt
from srlm.models.backbone import load_for_inference, load_tokenizer
from srlm.inference.engine import Engine, Sampling, common_prefix

PROMPTS = ["What is the capital of France?", "Write a haiku about rain and the sea.", "Explain recursion.",
           "Name three fruits that are red.", "Why is the sky blue?"]


@pytest.fixture(scope="module")
def setup(tiny_model):
    model, tok = load_for_inference(tiny_model), load_tokenizer(tiny_model)
    ids = [encode_prompt(tok, p) for p in PROMPTS]
    return model, tok, ids


def engine(setup, **kw):
    model, tok, _ = setup
    return Engine(model, [tok.eos_token_id], tok.pad_token_id, **{"batch_size": 3, "min_prefix": 2, **kw})


def test_greedy_batched_matches_hf_generate_one_by_one(setup):
    model, tok, ids = setup
    eng = engine(setup)
    out = eng.generate(ids, 1, Sampling(temperature=0, max_new_tokens=12))
    assert eng.stats["prefix_tokens_reused"] > 0  # the chat header was shared
    for p, (sample,) in zip(ids, out):
        ref = model.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)[0, len(p):].tolist()
        assert sample.token_ids == ref[:len(sample.token_ids)]
        assert sample.finished == (sample.token_ids[-1] == tok.eos_token_id)


def test_sample_logp_equals_a_forward_pass(setup):
    model, tok, ids = setup
    out = engine(setup, seed=3).generate(ids[:3], 2, Sampling(temperature=1.0, top_p=0.95, max_new_tokens=10))
    for p, group in zip(ids, out):
        for s in group:
            full = torch.tensor([p + s.token_ids])
            with torch.no_grad():
                lp = torch.log_softmax(model(full).logits[0, len(p) - 1:-1].float(), -1)
            expect = lp.gather(1, torch.tensor(s.token_ids)[:, None]).sum().item()
            assert abs(expect - s.logp) < 1e-3


def test_one_prefill_per_prompt_for_its_n_samples(setup):
    _, _, ids = setup
    one = engine(setup, share_prefix=False)
    one.generate(ids, 1, Sampling(max_new_tokens=2))
    four = engine(setup, share_prefix=False)
    out = four.generate(ids, 4, Sampling(max_new_tokens=2))
    assert all(len(g) == 4 for g in out)
    assert four.stats["prefill_tokens"] == one.stats["prefill_tokens"] == sum(len(p) for p in ids)


def test_shared_prefix_changes_nothing(setup):
    tok = setup[1]  # a long instruction shared by every prompt, as the judge rubric is
    long = [encode_prompt(tok, "Read the rubric carefully and then answer. " * 5 + p) for p in PROMPTS]
    a = torch.stack(engine(setup, share_prefix=True).next_token_logprobs(long))
    b = torch.stack(engine(setup, share_prefix=False).next_token_logprobs(long))
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    ga = engine(setup, share_prefix=True).generate(long, 1, Sampling(temperature=0, max_new_tokens=8))
    gb = engine(setup, share_prefix=False).generate(long, 1, Sampling(temperature=0, max_new_tokens=8))
    assert [g[0].token_ids for g in ga] == [g[0].token_ids for g in gb]


def test_on_batch_sees_every_prompt_once(setup):
    _, _, ids = setup
    seen = []
    engine(setup).generate(ids, 2, Sampling(max_new_tokens=3), on_batch=lambda idx, groups: seen.extend(idx))
    assert sorted(seen) == list(range(len(ids)))


def test_a_batchs_key_values_are_freed_before_the_next_batchs_prefill(setup):
    """One batch's cache in memory at a time: a generative judge's is about 0.8 GB on the embedded model."""
    import weakref

    _, _, ids = setup
    eng = engine(setup, batch_size=2)
    caches, alive_at_prefill = [], []
    prefill = eng._prefill

    def recording(*args, **kwargs):
        alive_at_prefill.append(sum(ref() is not None for ref in caches))
        out = prefill(*args, **kwargs)
        caches.append(weakref.ref(out[1]))
        return out

    eng._prefill = recording
    eng.generate(ids, 3, Sampling(max_new_tokens=4))
    assert len(alive_at_prefill) == 3 and alive_at_prefill == [0, 0, 0]


@pytest.mark.parametrize("share", [True, False])
def test_generation_batches_are_bounded_by_tokens_with_their_samples(setup, share):
    """A batch's key/value cache is its prompts (once with shared samples, n times without) and the samples' new
    tokens: k samples of long judge prompts must not hold more than the budget (the default loop's generative
    judge peaked 1 GB above everything else)."""
    _, tok, ids = setup
    prompts = [ids[0] * 4, ids[1] * 2] + ids[2:]
    cfg, n = Sampling(temperature=0, max_new_tokens=6), 3
    cost = (lambda length: length + n * 6) if share else (lambda length: n * (length + 6))
    budget = cost(len(ids[2])) * 2 + 1  # two short prompts fit, a long one runs alone
    eng = engine(setup, batch_size=4, max_batch_tokens=budget, share_samples=share)
    batches, prefill = [], eng._prefill

    def recording(batch, *args, **kwargs):
        batches.append([len(p) for p in batch])
        return prefill(batch, *args, **kwargs)

    eng._prefill = recording
    bounded = eng.generate(prompts, n, cfg)
    assert len(batches) > 2 and sum(len(b) for b in batches) == len(prompts)
    assert all(len(b) * cost(max(b)) <= budget or len(b) == 1 for b in batches)
    assert eng.stats["shared_prompt_batches"] == (len(batches) if share else 0)
    unbounded = engine(setup, batch_size=4, max_batch_tokens=10**9, share_samples=share).generate(prompts, n, cfg)
    assert [[s.token_ids for s in g] for g in bounded] == [[s.token_ids for s in g] for g in unbounded]


def test_samples_sharing_their_prompts_key_values_sample_what_repeated_key_values_do(setup):
    """shared_kv's attention (prompt part and own part merged) gives the model's distribution: same tokens from
    the same generator, same log-probs; rows finish at different steps, prompts are padded and share a prefix."""
    tok = setup[1]
    long = [encode_prompt(tok, "Read the rubric carefully and then answer. " * 3 + p) for p in PROMPTS]
    cfg = Sampling(temperature=1.0, top_p=0.95, max_new_tokens=24)
    model = setup[0]
    stops = range(0, model.config.vocab_size, 8)  # an eighth of the vocabulary ends a sample: rows finish apart
    shared, repeated = (Engine(model, stops, tok.pad_token_id, batch_size=3, min_prefix=2, seed=5, share_samples=flag)
                        for flag in (True, False))
    a, b = shared.generate(long, 3, cfg), repeated.generate(long, 3, cfg)
    assert shared.stats["shared_prompt_batches"] == 2 and repeated.stats["shared_prompt_batches"] == 0
    assert shared.stats["prefix_tokens_reused"] > 0
    assert [[s.token_ids for s in g] for g in a] == [[s.token_ids for s in g] for g in b]
    assert len({len(s.token_ids) for g in a for s in g}) > 1  # some rows left the batch before others
    for ga, gb in zip(a, b):
        for sa, sb in zip(ga, gb):
            assert abs(sa.logp - sb.logp) < 1e-3 and sa.finished == sb.finished


def test_dropping_finished_rows_keeps_the_cache_in_its_storage():
    """A second storage beside the first, when samples finish, doubled the cache at its largest."""
    from srlm.inference.kv_cache import ReservedLayer

    layer = ReservedLayer(reserve=4)
    layer.update(torch.randn(4, 3, 5, 8), torch.randn(4, 3, 5, 8))
    storage = layer._k.untyped_storage().data_ptr()
    kept = layer.keys[[0, 2]].clone()
    layer.batch_select_indices(torch.tensor([0, 2]))
    assert layer._k.untyped_storage().data_ptr() == storage and torch.equal(layer.keys, kept)
    k, _ = layer.update(torch.ones(2, 3, 1, 8), torch.ones(2, 3, 1, 8))
    assert k.shape == (2, 3, 6, 8) and torch.equal(k[:, :, :5], kept)


def test_common_prefix():
    assert common_prefix([[1, 2, 3], [1, 2, 4], [1, 2]]) == 2
    assert common_prefix([[5], [6]]) == 0


def test_nucleus_sampler_is_exact_and_falls_back_for_flat_rows():
    from srlm.inference.engine import _top_p_sample

    torch.manual_seed(0)
    vocab, draws, cfg = 400, 3000, Sampling(temperature=0.7, top_p=0.9)
    logits = torch.stack([torch.randn(vocab) * 4, torch.randn(vocab) * 0.1])  # peaked; flat (nucleus > top_k)

    def reference(row):  # the textbook way: sort the whole vocabulary
        p = torch.softmax(row / cfg.temperature, -1)
        sp, order = p.sort(descending=True)
        sp = sp.masked_fill(sp.cumsum(-1) - sp > cfg.top_p, 0.0)
        out = torch.zeros(vocab)
        out[order] = sp / sp.sum()
        return out

    gen = torch.Generator().manual_seed(1)
    counts = torch.zeros(2, vocab)
    for _ in range(draws):
        t = _top_p_sample(logits, cfg, gen, top_k=32)
        counts[torch.arange(2), t] += 1
    for row in range(2):
        expect, seen = reference(logits[row]), counts[row] / draws
        assert not bool(((seen > 0) & (expect == 0)).any())  # never outside the nucleus
        assert (seen - expect).abs().sum() < 0.6  # total variation: sampling noise only (a wrong set gives > 1)
    assert int((reference(logits[1]) > 0).sum()) > 32  # the flat row did need the fallback


def test_reserved_cache_layer_behaves_like_dynamic_layer():
    from transformers.cache_utils import DynamicLayer

    from srlm.inference.kv_cache import ReservedLayer

    torch.manual_seed(0)
    ours, theirs = ReservedLayer(reserve=3), DynamicLayer()
    steps = [torch.randn(2, 3, 5, 4)] + [torch.randn(2, 3, 1, 4) for _ in range(6)]  # prefill, then decode
    for i, kv in enumerate(steps):
        if i == 2:
            for layer in (ours, theirs):
                layer.batch_repeat_interleave(2)
        if i == 4:
            for layer in (ours, theirs):
                layer.batch_select_indices(torch.tensor([0, 3]))
        kv = kv.repeat_interleave(2, 0) if i >= 2 else kv
        kv = kv[[0, 3]] if i >= 4 else kv
        k1, v1 = ours.update(kv, -kv)
        k2, v2 = theirs.update(kv, -kv)
        assert torch.equal(k1, k2) and torch.equal(v1, v2)
        assert ours.get_seq_length() == theirs.get_seq_length()
    ours.crop(-2)
    theirs.crop(-2)
    assert torch.equal(ours.keys, theirs.keys) and ours.get_seq_length() == 9


def test_scoring_batches_are_bounded_by_tokens_and_give_the_same_logprobs(setup):
    _, _, ids = setup
    prompts = [ids[0] * 6, ids[1]] + ids[2:]  # one long prompt among short ones
    eng = engine(setup, batch_size=4, max_batch_tokens=len(prompts[0]) + 1)
    chunks = list(eng._chunks(prompts, 4, eng.max_batch_tokens))
    assert chunks[0] == [0] and sorted(i for c in chunks for i in c) == list(range(len(prompts)))
    assert all(len(c) * max(len(prompts[i]) for i in c) <= eng.max_batch_tokens or len(c) == 1 for c in chunks)
    a = torch.stack(eng.next_token_logprobs(prompts))
    b = torch.stack(engine(setup, batch_size=4, max_batch_tokens=10**9).next_token_logprobs(prompts))
    assert torch.allclose(a, b, atol=1e-4)


def judge_like_prompts(tok):
    """A shared rubric, then three questions with three or four replies each (a judge's prompts)."""
    rubric = "Read the rubric carefully and then score the reply. " * 4
    questions = ["What is the capital of France and why is it famous?", "Explain recursion to a child, briefly.",
                 "Name three fruits that are red and say where they grow."]
    replies = ["Paris.", "It is Paris, known for art and food.", "I do not know.", "Lyon, probably.",
               "A function that calls itself.", "Recursion is when a thing is defined by itself, like mirrors.",
               "Loops.", "Apple, cherry, strawberry.", "Red fruits grow on trees.", "Bananas."]
    cut = [(0, 4), (4, 7), (7, 10)]
    return [encode_prompt(tok, f"{rubric}\nQuestion: {q}\nReply: {r}\nScore it.")
            for q, (a, b) in zip(questions, cut) for r in replies[a:b]]


def test_group_prompts_finds_each_questions_replies():
    from srlm.inference.engine import group_prompts

    prompts = [[9, 1, 1, 1, 1, 5], [9, 2, 2, 2, 2, 7], [9, 1, 1, 1, 1, 6, 6], [9, 2, 2, 2, 2, 8], [9, 3, 4]]
    groups = group_prompts(prompts, 1, min_shared=4)
    assert sorted(groups) == [([0, 2], 4), ([1, 3], 4), ([4], 0)]
    assert group_prompts(prompts, 1, min_shared=5) == [([i], 0) for i in (0, 2, 1, 3, 4)]
    assert all(len(m) <= 1 for m, _ in group_prompts(prompts, 1, min_shared=4, max_rows=1))
    # a member must keep at least one token of its own after the shared part
    assert group_prompts([[1, 2, 3], [1, 2, 3]], 0, min_shared=2) == [([0, 1], 2)]


def test_prefix_tree_changes_nothing(setup):
    """Sharing each question's tokens across its replies: the same log-probs and samples as no sharing."""
    tok = setup[1]
    prompts = judge_like_prompts(tok)
    tree = engine(setup, batch_size=4, min_group=2)
    a = torch.stack(tree.next_token_logprobs(prompts))
    assert tree.stats["group_tokens_reused"] > 0 and tree.stats["prefix_tokens_reused"] > 0
    flat = engine(setup, batch_size=4, share_groups=False)
    b = torch.stack(flat.next_token_logprobs(prompts))
    c = torch.stack(engine(setup, batch_size=4, share_prefix=False).next_token_logprobs(prompts))
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(a, c, atol=1e-4, rtol=1e-4)
    assert tree.stats["prefill_tokens"] < flat.stats["prefill_tokens"]
    # scoring windows keep a question's replies together, in any order of the prompts
    shuffled = [prompts[i] for i in (9, 0, 4, 7, 1, 5, 2, 8, 6, 3)]
    windows = list(tree._windows(shuffled, common_prefix(shuffled), 2, None, 4))
    assert sorted(i for _, batches in windows for c in batches for i in c) == list(range(10))
    questions = [{1, 4, 6, 9}, {2, 5, 8}, {0, 3, 7}]
    assert sorted(sorted(set(i for c in batches for i in c)) for _, batches in windows) == sorted(map(sorted, questions))
    assert all(len(c) <= 2 for _, batches in windows for c in batches)
    # generation (its batches cut across questions, so some rows have no group): greedy gives the same tokens;
    # sampled tokens carry the log-probs of a plain forward pass over prompt + sample
    greedy = Sampling(temperature=0, max_new_tokens=8)
    ga = engine(setup, batch_size=4, min_group=2).generate(prompts, 2, greedy)
    gb = engine(setup, batch_size=4, share_prefix=False).generate(prompts, 2, greedy)
    assert [[s.token_ids for s in g] for g in ga] == [[s.token_ids for s in g] for g in gb]
    sampler = engine(setup, batch_size=4, min_group=2, seed=5)
    out = sampler.generate(prompts, 2, Sampling(temperature=1.0, top_p=0.95, max_new_tokens=8))
    assert sampler.stats["group_tokens_reused"] > 0
    model = setup[0]
    for p, group in zip(prompts, out):
        for s in group:
            with torch.no_grad():
                lp = torch.log_softmax(model(torch.tensor([p + s.token_ids])).logits[0, len(p) - 1:-1].float(), -1)
            assert abs(lp.gather(1, torch.tensor(s.token_ids)[:, None]).sum().item() - s.logp) < 1e-3


def test_scoring_keeps_no_key_values_of_its_batches(setup):
    """A scoring forward's own key/values are read by its attention only: its cache keeps the shared context
    (prefix, questions) and none of the batch's tokens, and the log-probs are a plain forward's."""
    model, tok, _ = setup
    prompts = judge_like_prompts(tok)
    for kw in ({"min_group": 2}, {"share_groups": False}, {"share_prefix": False}):
        eng = engine(setup, batch_size=4, **kw)
        held = []  # (tokens the cache keeps, tokens the forward attended over) per batch
        for name in ("_plain_prefill", "_tree_prefill"):
            def spy(*args, _f=getattr(eng, name), **kwargs):
                out = _f(*args, **kwargs)
                held.append((max(layer.get_seq_length() for layer in out[1].layers), out[2].shape[1]))
                return out
            setattr(eng, name, spy)
        got = eng.next_token_logprobs(prompts)
        assert held and all(kept < attended for kept, attended in held)
        for lp, p in zip(got, prompts):
            with torch.no_grad():
                ref = torch.log_softmax(model(torch.tensor([p])).logits[0, -1].float(), -1)
            torch.testing.assert_close(lp, ref, atol=1e-4, rtol=1e-4)
