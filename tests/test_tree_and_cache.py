"""The small plain functions of a round: tree building, masks, greedy acceptance, KV compaction."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaModel, StaticCache

from specvlm_hf.hf_internals import cache_argument_name
from specvlm_hf.kv_cache import FixedWindow, GrowingWindow, compact_kv, compact_static_kv, crop_kv
from specvlm_hf.tree import additive_mask, build_dynamic_tree, tree_from_parents
from specvlm_hf.verify import accept_greedy


def fake_draft_step(vocab: int, seed: int = 0):
    """A draft step whose log-probabilities depend on (token, level) only, recording every call."""
    table = torch.log_softmax(torch.randn(vocab, 8, vocab, generator=torch.Generator().manual_seed(seed)) * 3, -1)
    calls = []

    def step(tokens, parent_hidden, level, ancestor_mask):
        calls.append((tokens.clone(), level, ancestor_mask.clone()))
        return parent_hidden + 1, table[tokens, level]

    return step, calls, table


@pytest.mark.parametrize("top_k,depth,total", [(10, 7, 60), (3, 4, 20), (1, 5, 10), (5, 0, 6), (4, 6, 200)])
def test_dynamic_tree_is_a_connected_tree_of_the_best_paths(top_k, depth, total):
    vocab = 30
    step, calls, table = fake_draft_step(vocab)
    root_log_probs = torch.log_softmax(torch.randn(vocab, generator=torch.Generator().manual_seed(1)) * 3, -1)
    tree = build_dynamic_tree(7, root_log_probs, torch.zeros(4), step, top_k=top_k, depth=depth, total_tokens=total)

    candidates = top_k + depth * top_k * top_k if top_k > 1 else 1 + depth
    assert tree.num_nodes == min(total, 1 + candidates)
    assert tree.tokens[0] == 7 and tree.parents[0] == -1
    assert bool((tree.parents[1:] < torch.arange(1, tree.num_nodes)).all()), "parents precede children"
    assert int(tree.depths.max()) <= depth + 1
    assert len(calls) == depth
    # scores are path sums of draft log-probabilities, and never rise along a path
    for node in range(1, tree.num_nodes):
        parent = int(tree.parents[node])
        assert tree.scores[node] <= tree.scores[parent] + 1e-6
        if parent == 0:
            expected = root_log_probs[tree.tokens[node]]
        else:
            expected = tree.scores[parent] + table[tree.tokens[parent], int(tree.depths[parent]), tree.tokens[node]]
        assert torch.isclose(tree.scores[node], expected, atol=1e-5)
    # siblings come in descending score
    for node in range(tree.num_nodes):
        children = tree.children(node)
        assert tree.scores[children].tolist() == sorted(tree.scores[children].tolist(), reverse=True)
    # every root-to-leaf path starts at the root and follows parent links
    for path in tree.paths.tolist():
        nodes = [n for n in path if n >= 0]
        assert nodes[0] == 0
        assert all(int(tree.parents[b]) == a for a, b in zip(nodes, nodes[1:]))


def test_tree_keeps_the_globally_best_candidates():
    vocab = 12
    step, _, _ = fake_draft_step(vocab, seed=3)
    root = torch.log_softmax(torch.randn(vocab, generator=torch.Generator().manual_seed(4)) * 3, -1)
    small = build_dynamic_tree(0, root, torch.zeros(2), step, top_k=3, depth=3, total_tokens=8)
    large = build_dynamic_tree(0, root, torch.zeros(2), step, top_k=3, depth=3, total_tokens=1000)
    kept = sorted(small.scores[1:].tolist(), reverse=True)
    best = sorted(large.scores[1:].tolist(), reverse=True)[: len(kept)]
    assert kept == pytest.approx(best)


def test_draft_steps_see_their_ancestors_only():
    step, calls, _ = fake_draft_step(20)
    root = torch.log_softmax(torch.randn(20, generator=torch.Generator().manual_seed(5)) * 3, -1)
    build_dynamic_tree(0, root, torch.zeros(2), step, top_k=2, depth=3, total_tokens=10)
    for index, (tokens, level, mask) in enumerate(calls):
        assert level == index + 1
        assert mask.shape == (2, 2 * level)
        assert mask.sum(dim=1).tolist() == [level, level], "each node sees one entry per level above and itself"
        assert bool(mask[:, -2:].equal(torch.eye(2, dtype=torch.bool)))


def test_tree_mask_and_depths():
    tree = tree_from_parents(torch.tensor([9, 1, 2, 3]), torch.tensor([-1, 0, 0, 1]))
    visible = GrowingWindow(None, torch.tensor([False, True, True])).visible(tree.ancestor_mask)
    assert visible.tolist() == [
        [False, True, True, True, False, False, False],
        [False, True, True, True, True, False, False],
        [False, True, True, True, False, True, False],
        [False, True, True, True, True, False, True],
    ]
    assert tree.depths.tolist() == [0, 1, 1, 2]
    assert tree.paths.tolist() == [[0, -1, -1, -1], [0, 1, -1, -1], [0, 2, -1, -1], [0, 1, 3, -1]]


def test_tree_from_parents_rejects_a_child_before_its_parent():
    with pytest.raises(ValueError, match="parents"):
        tree_from_parents(torch.tensor([0, 1, 2]), torch.tensor([-1, 2, 0]))


def sequential_greedy(tree, scores):
    """Reference: walk from the root, following the child whose token is the target's choice."""
    node, nodes = 0, [0]
    while True:
        choice = int(scores[node].argmax())
        match = [c for c in tree.children(node) if int(tree.tokens[c]) == choice]
        if not match:
            return nodes, choice
        node = match[0]
        nodes.append(node)


@pytest.mark.parametrize("seed", range(20))
def test_greedy_acceptance_matches_a_sequential_walk(seed):
    generator = torch.Generator().manual_seed(seed)
    vocab, num_nodes = 4, 25
    parents, tokens, used = [-1], [0], {0: []}
    for node in range(1, num_nodes):  # siblings carry distinct tokens, as top-k drafts do
        parent = int(torch.randint(0, node, (1,), generator=generator))
        free = [t for t in torch.randperm(vocab, generator=generator).tolist() if t not in used.get(parent, [])]
        if not free:
            parent, free = node - 1, [int(torch.randint(0, vocab, (1,), generator=generator))]
        parents.append(parent)
        tokens.append(free[0])
        used.setdefault(parent, []).append(free[0])
        used.setdefault(node, [])
    tree = tree_from_parents(torch.tensor(tokens), torch.tensor(parents))
    scores = torch.randn(num_nodes, vocab, generator=generator)
    acceptance = accept_greedy(tree, scores)
    assert (acceptance.nodes, acceptance.next_token) == sequential_greedy(tree, scores)


def _tiny_llama():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    model = LlamaModel(config).eval()
    name = cache_argument_name(model.forward)  # `cache` from transformers 5.24, `past_key_values` before

    def run(cache, **kwargs):
        return model(**kwargs, use_cache=True, **{name: cache})

    return run, config


@pytest.mark.parametrize("seed", range(6))
def test_fixed_width_masks_equal_the_concatenated_ones(seed):
    """The fast path's window (device-side length, fixed width) shows the same slots as the eager loop's growing
    window, padded to the width."""
    generator = torch.Generator().manual_seed(seed)
    width = 40
    length = int(torch.randint(0, 25, (1,), generator=generator))
    queries, block = (
        int(torch.randint(1, 8, (1,), generator=generator)),
        int(torch.randint(1, 12, (1,), generator=generator)),
    )
    real = torch.rand(width, generator=generator) > 0.3
    block_mask = torch.rand(queries, block, generator=generator) > 0.5
    growing = GrowingWindow(None, real[:length]).visible(block_mask)
    expected = torch.cat([growing, growing.new_zeros(queries, width - length - block)], dim=1)
    fixed = FixedWindow(None, width, torch.device("cpu"))
    fixed.load(real[:length])
    fixed.real[length:] = real[length:]  # stale flags past the length must not show
    assert torch.equal(fixed.visible(block_mask), expected)


@pytest.mark.parametrize("static", [False, True, "device"])
def test_compacted_cache_equals_recomputing_the_accepted_sequence(static):
    run, config = _tiny_llama()
    prefix = torch.randint(0, 50, (1, 7))
    tree = tree_from_parents(torch.tensor([4, 8, 9, 10, 11]), torch.tensor([-1, 0, 0, 2, 3]))
    kept = [0, 2, 3]
    if static:
        cache = StaticCache(config=config, max_cache_len=32)
    else:
        cache = DynamicCache(config=config)
    with torch.no_grad():
        run(cache, input_ids=prefix)
        visible = GrowingWindow(None, torch.ones(7, dtype=torch.bool)).visible(tree.ancestor_mask)
        if static:
            visible = torch.cat([visible, visible.new_zeros(5, 32 - 12)], dim=1)
        mask = additive_mask(visible, torch.float32)[None, None]
        run(cache, input_ids=tree.tokens[None], attention_mask=mask, position_ids=(tree.depths + 7)[None])
        if static:  # the fast path's form: lengths and nodes on the device, padded to a fixed width
            compact_static_kv(
                cache,
                torch.tensor(7),
                torch.tensor(kept + [4, 1] if static == "device" else kept),
                torch.tensor(len(kept)),
            )
        else:
            compact_kv(cache, 7, kept)
        assert int(cache.get_seq_length()) == 10

        reference = DynamicCache(config=config)
        run(reference, input_ids=torch.cat([prefix, tree.tokens[kept][None]], dim=1))
    for layer, ref in zip(cache.layers, reference.layers):
        assert torch.allclose(layer.keys[..., :10, :], ref.keys, atol=1e-5)
        assert torch.allclose(layer.values[..., :10, :], ref.values, atol=1e-5)


def test_crop_drops_a_suffix_only():
    run, config = _tiny_llama()
    cache = DynamicCache(config=config)
    with torch.no_grad():
        run(cache, input_ids=torch.randint(0, 50, (1, 9)))
    keys = cache.layers[0].keys.clone()
    crop_kv(cache, 5)
    assert cache.get_seq_length() == 5 and torch.equal(cache.layers[0].keys, keys[..., :5, :])
    crop_kv(cache, 8)  # longer than the cache: nothing happens
    assert cache.get_seq_length() == 5


def test_logits_processors_see_each_nodes_own_sequence():
    """`processed_scores` equals running the processors on every node's own sequence, also where a minimum-length
    rule acts on some of the tree's depths and not on others (and where it takes the one-call shortcut)."""
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        MinLengthLogitsProcessor,
        MinNewTokensLengthLogitsProcessor,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
    )

    from specvlm_hf.decoding import processed_scores

    generator = torch.Generator().manual_seed(0)
    tree = tree_from_parents(torch.tensor([4, 2, 9, 2, 7, 2]), torch.tensor([-1, 0, 0, 1, 2, 4]), max_depth=4)
    logits = torch.randn(tree.num_nodes, 12, generator=generator)
    ids = torch.randint(3, 12, (1, 14), generator=generator)
    rule_sets = {
        "length rules": lambda: [
            MinNewTokensLengthLogitsProcessor(4, 3, eos_token_id=2),
            MinLengthLogitsProcessor(9, 2),
            TemperatureLogitsWarper(0.7),
        ],
        "sequence rule": lambda: [RepetitionPenaltyLogitsProcessor(1.5), MinLengthLogitsProcessor(9, 2)],
    }
    for name, make in rule_sets.items():
        for prefix_length in range(4, 14):
            processors = LogitsProcessorList(make())
            prefix = ids[:, :prefix_length]
            out = processed_scores(tree, prefix, logits, processors)
            for node in range(tree.num_nodes):
                path = [int(i) for i in tree.paths[node] if i > 0]
                sequence = torch.cat([prefix, tree.tokens[path][None]], dim=1)
                expected = processors(sequence, logits[node : node + 1].clone())[0]
                assert torch.equal(out[node], expected), (name, prefix_length, node)
