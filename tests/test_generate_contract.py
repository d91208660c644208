"""What `generate` users rely on keeps working with a SpecVLM draft, and user errors are explained."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import LlamaConfig
from transformers.generation.streamers import BaseStreamer

import specvlm_hf
from specvlm_hf import DraftTargetMismatchError, SpecVLMDraftModel
from tiny_models import oracle_draft, random_inputs, tiny_llava

MODES = ["tree", "chain", "tree-static"]  # tree-static: the fast path (`cache_implementation="static"`)


@pytest.fixture(scope="module")
def setup():
    target = specvlm_hf.enable(tiny_llava(scale=32.0))
    inputs = random_inputs(target, torch.Generator().manual_seed(11), text_tokens=5)
    return target, inputs


def draft_for(target, mode, noise=0.0):
    draft = oracle_draft(target, noise=noise)
    draft.config.decoding_mode = mode.split("-")[0]
    return draft


def path_kwargs(mode) -> dict:
    """The `generate` arguments that select the decoding path of `mode`."""
    return {"cache_implementation": "static"} if mode.endswith("static") else {}


def plain_and_spec(target, inputs, mode, **kwargs):
    plain = target.generate(**inputs, **kwargs)
    draft = draft_for(target, mode)
    spec = target.generate(**inputs, **kwargs, assistant_model=draft, **path_kwargs(mode))
    assert hasattr(draft, "_specvlm_fast_path") == mode.endswith("static"), "the mode's own path ran"
    return plain, spec, draft


@pytest.mark.parametrize("mode", MODES)
def test_eos_token_lists_stop_generation_where_plain_generate_stops(setup, mode):
    target, inputs = setup
    reference = target.generate(**inputs, max_new_tokens=30, min_new_tokens=30, do_sample=False)
    new = reference[0, inputs["input_ids"].shape[1] :].tolist()
    eos = [new[9], new[14]]  # two tokens the continuation produces: it must stop at the first of them
    plain, spec, _ = plain_and_spec(
        target, inputs, mode, max_new_tokens=30, do_sample=False, eos_token_id=eos, pad_token_id=0
    )
    assert spec.tolist() == plain.tolist()
    assert spec[0, -1].item() in eos and spec.shape[1] < reference.shape[1]


@pytest.mark.parametrize("do_sample", [False, True], ids=["greedy", "sampling"])
@pytest.mark.parametrize("mode", MODES)
def test_a_prompt_ending_in_an_eos_token_still_gets_new_tokens(setup, mode, do_sample):
    """Plain `generate` always adds a token after the prompt, whatever the prompt's last token. transformers' own
    assisted loop (which chain mode runs) asks whether its candidates are done before verifying them, and without
    candidates that is the prompt: 5.17 then added nothing (`hf_internals.CandidateStopCheck` answers it)."""
    target, inputs = setup
    eos = [inputs["input_ids"][0, -1].item(), target.generation_config.eos_token_id]
    for extra in ({}, {"min_new_tokens": 2}):
        kwargs = dict(max_new_tokens=8, do_sample=do_sample, eos_token_id=eos, pad_token_id=0, **extra)
        torch.manual_seed(3)
        plain = target.generate(**inputs, **kwargs)
        torch.manual_seed(3)
        _, spec, _ = plain_and_spec(target, inputs, mode, **kwargs)
        start = inputs["input_ids"].shape[1]
        assert spec.shape[1] > start, "no token after the prompt"
        if not do_sample:  # sampled tokens are compared by distribution elsewhere; here: decoding went on
            assert spec.tolist() == plain.tolist()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("limit", ["max_new_tokens", "max_length"])
def test_length_limits_are_exact(setup, mode, limit):
    target, inputs = setup
    prompt = inputs["input_ids"].shape[1]
    for budget in (1, 2, 7, 13):
        kwargs = {limit: budget if limit == "max_new_tokens" else prompt + budget}
        plain, spec, _ = plain_and_spec(target, inputs, mode, min_new_tokens=budget, do_sample=False, **kwargs)
        assert spec.tolist() == plain.tolist() and spec.shape[1] == prompt + budget


def piece_tokenizer(vocab: int):
    """A real fast tokenizer: ids 0-25 are the letters a-z, the others 2-character pieces ("Ab", "Ac", ...)."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    letters = [chr(97 + i) for i in range(26)]
    pairs = [chr(65 + i // 26) + chr(97 + i % 26) for i in range(vocab - 26)]
    pieces = {piece: i for i, piece in enumerate(letters + pairs)}
    backend = Tokenizer(models.BPE(pieces, merges=[], unk_token="a"))
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend)


@pytest.mark.parametrize("mode", MODES)
def test_stop_strings_stop_at_the_same_token(setup, mode):
    target, inputs = setup
    tokenizer = piece_tokenizer(target.config.text_config.vocab_size)
    reference = target.generate(**inputs, max_new_tokens=30, min_new_tokens=30, do_sample=False)
    new = reference[0, inputs["input_ids"].shape[1] :].tolist()
    stop = tokenizer.decode(new[6:8])[1:]  # spans a token boundary
    plain, spec, _ = plain_and_spec(
        target, inputs, mode, max_new_tokens=30, do_sample=False, stop_strings=[stop], tokenizer=tokenizer
    )
    assert spec.tolist() == plain.tolist()
    assert plain.shape[1] < reference.shape[1]


class RecordingStreamer(BaseStreamer):
    def __init__(self):
        self.puts, self.ended = [], False

    def put(self, value):
        self.puts.append(value.reshape(-1).tolist())

    def end(self):
        self.ended = True


@pytest.mark.parametrize("mode", MODES)
def test_streamer_receives_every_token_in_order(setup, mode):
    target, inputs = setup
    streamer = RecordingStreamer()
    draft = draft_for(target, mode)
    out = target.generate(
        **inputs,
        max_new_tokens=24,
        min_new_tokens=24,
        do_sample=False,
        assistant_model=draft,
        streamer=streamer,
        **path_kwargs(mode),
    )
    assert streamer.ended
    assert streamer.puts[0] == inputs["input_ids"][0].tolist(), "the prompt first, as plain generate does"
    streamed = [token for chunk in streamer.puts[1:] for token in chunk]
    assert streamed == out[0, inputs["input_ids"].shape[1] :].tolist()
    assert max(len(chunk) for chunk in streamer.puts[1:]) > 1, "accepted tokens are pushed together, per round"


@pytest.mark.parametrize("mode", MODES)
def test_return_dict_in_generate_with_scores_and_logits(setup, mode):
    target, inputs = setup
    kwargs = dict(
        max_new_tokens=12,
        min_new_tokens=12,
        do_sample=False,
        return_dict_in_generate=True,
        output_scores=True,
        output_logits=True,
        repetition_penalty=1.3,
    )
    plain, spec, _ = plain_and_spec(target, inputs, mode, **kwargs)
    assert spec.sequences.tolist() == plain.sequences.tolist()
    assert len(spec.scores) == len(plain.scores) == 12 and len(spec.logits) == 12
    for mine, theirs in zip(spec.scores, plain.scores):
        finite = torch.isfinite(theirs)
        assert torch.equal(finite, torch.isfinite(mine))
        assert torch.allclose(mine[finite], theirs[finite], atol=1e-4)
    for mine, theirs in zip(spec.logits, plain.logits):
        assert torch.allclose(mine, theirs, atol=1e-4)


@pytest.mark.parametrize("mode", MODES)
def test_left_padded_attention_mask(setup, mode):
    target, inputs = setup
    padded = dict(inputs)
    padded["input_ids"] = torch.cat([torch.zeros(1, 3, dtype=torch.long), inputs["input_ids"]], dim=1)
    padded["attention_mask"] = torch.cat([torch.zeros(1, 3, dtype=torch.long), inputs["attention_mask"]], dim=1)
    plain, spec, draft = plain_and_spec(target, padded, mode, max_new_tokens=20, min_new_tokens=20, do_sample=False)
    assert spec.tolist() == plain.tolist()
    unpadded = target.generate(**inputs, max_new_tokens=20, min_new_tokens=20, do_sample=False)
    assert spec[0, 3:].tolist() == unpadded[0].tolist(), "padding changes nothing but the prefix"


@pytest.mark.parametrize("mode", MODES)
def test_threads_sharing_a_target_and_a_draft_each_get_their_own_output(setup, mode):
    """A server's worker threads calling `generate` with one target and one draft: the calls run one at a time
    (a draft holds one call's caches and graphs; before the lock the fast path returned other calls' tokens)."""
    import threading

    target, _ = setup
    generator = torch.Generator().manual_seed(21)
    prompts = [random_inputs(target, generator, text_tokens=3 + i) for i in range(4)]
    kwargs = dict(max_new_tokens=16, min_new_tokens=16, do_sample=False)
    expected = [target.generate(**prompt, **kwargs).tolist() for prompt in prompts]
    draft, outputs, errors = draft_for(target, mode, noise=0.003), {}, []

    def work(index):
        for call in range(4):
            try:
                out = target.generate(**prompts[index], **kwargs, assistant_model=draft, **path_kwargs(mode))
                outputs[index, call] = out.tolist()
            except Exception as error:  # noqa: BLE001 - reported below
                errors.append(error)

    threads = [threading.Thread(target=work, args=(index,)) for index in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors[:2]
    assert all(outputs[index, call] == expected[index] for index in range(4) for call in range(4))


def test_plain_generate_in_another_thread_does_not_feed_the_drafts_features(setup):
    """A call's feature hooks on the target record its own forwards only: plain `generate` on the same target in
    another thread leaves the draft's inputs, hence every round's accepted count, as in a call alone."""
    import threading

    target, inputs = setup
    other = random_inputs(target, torch.Generator().manual_seed(22), text_tokens=9)
    kwargs = dict(max_new_tokens=24, min_new_tokens=24, do_sample=False)
    draft = draft_for(target, "chain", noise=0.003)
    target.generate(**inputs, **kwargs, assistant_model=draft)
    alone = list(draft.stats.accepted_per_round)
    stop = threading.Event()

    def plain_calls():
        while not stop.is_set():
            target.generate(**other, max_new_tokens=4, do_sample=False)

    thread = threading.Thread(target=plain_calls)
    thread.start()
    try:
        for _ in range(3):
            target.generate(**inputs, **kwargs, assistant_model=draft)
            assert draft.stats.accepted_per_round == alone
    finally:
        stop.set()
        thread.join()


def test_generate_from_inside_a_call_with_its_own_draft_is_refused(setup):
    target, inputs = setup
    draft = draft_for(target, "tree")

    class Reentering(BaseStreamer):
        def put(self, value):
            target.generate(**inputs, max_new_tokens=2, assistant_model=draft)

        def end(self):
            pass

    from specvlm_hf.errors import UserError

    with pytest.raises(UserError, match="from inside a generate call that is decoding with it"):
        target.generate(**inputs, max_new_tokens=4, assistant_model=draft, streamer=Reentering())
    assert target.generate(**inputs, max_new_tokens=4, assistant_model=draft).shape[1] > inputs["input_ids"].shape[1]


@pytest.mark.parametrize("image", [True, False], ids=["image", "text"])
@pytest.mark.parametrize("mode", MODES)
def test_a_filled_cache_from_an_earlier_turn_is_refused_with_the_fix(setup, mode, image):
    """Continuing from an earlier turn's `past_key_values`: plain `generate` does; SpecVLM needs the whole prompt's
    features, and transformers' own assisted loop is not exact from a filled cache (before this check, chain mode
    returned other tokens and tree mode failed on a shape), so it is refused, naming the fix."""
    import copy

    target, inputs = setup
    if not image:
        inputs = random_inputs(target, torch.Generator().manual_seed(4), text_tokens=6, image=False)
    first = target.generate(**inputs, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    ids = torch.cat([first.sequences, torch.tensor([[5, 6, 7]])], dim=1)
    turn = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    plain = target.generate(**turn, past_key_values=copy.deepcopy(first.past_key_values))
    assert plain.shape[1] == ids.shape[1] + 4
    draft = draft_for(target, mode)
    with pytest.raises(ValueError, match="cannot continue from a filled cache.*whole conversation as `input_ids`"):
        target.generate(**turn, past_key_values=copy.deepcopy(first.past_key_values), assistant_model=draft)
    whole = dict(turn, **({"pixel_values": inputs["pixel_values"]} if image else {}))
    assert target.generate(**whole, assistant_model=draft, **path_kwargs(mode)).tolist() == (
        target.generate(**whole).tolist()
    )


@pytest.mark.parametrize("mode", MODES)
def test_classifier_free_guidance_is_refused_with_the_fix(setup, mode):
    """guidance_scale runs the model inside a logits processor, one token after another (before this check: a shape
    error from inside transformers in every mode)."""
    target, inputs = setup
    kwargs = dict(do_sample=False, max_new_tokens=3, guidance_scale=1.5)
    assert target.generate(**inputs, **kwargs).shape[1] == inputs["input_ids"].shape[1] + 3  # plain generate runs it
    with pytest.raises(ValueError, match="classifier-free guidance.*Drop `guidance_scale`"):
        target.generate(**inputs, **kwargs, assistant_model=draft_for(target, mode), **path_kwargs(mode))


@pytest.mark.parametrize("mode", MODES)
def test_inputs_embeds_without_ids_is_refused_with_the_fix(setup, mode):
    """A prompt given as `inputs_embeds` only (before: a shape error from inside chain mode's loop on 5.17 and from
    the draft's prefill on 5.25)."""
    target, _ = setup
    ids = random_inputs(target, torch.Generator().manual_seed(8), text_tokens=5, image=False)["input_ids"]
    embeds = target.get_input_embeddings()(ids).detach()
    kwargs = dict(inputs_embeds=embeds, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
    assert target.generate(**kwargs).shape[1] == 6  # plain generate takes it
    with pytest.raises(ValueError, match="needs the prompt's token ids.*Pass `input_ids`"):
        target.generate(**kwargs, assistant_model=draft_for(target, mode), **path_kwargs(mode))


def test_stats_describe_the_last_call(setup):
    target, inputs = setup
    draft = draft_for(target, "tree")
    out = target.generate(**inputs, max_new_tokens=30, min_new_tokens=30, do_sample=False, assistant_model=draft)
    stats = draft.stats
    assert stats.mode == "tree" and stats.new_tokens == 30 == out.shape[1] - inputs["input_ids"].shape[1]
    assert stats.rounds == len(stats.accepted_per_round) and stats.rounds < 29
    assert sum(stats.accepted_per_round) == 29, "every token but the prefill's comes from a round"
    assert stats.sigma == pytest.approx(29 / stats.rounds) and stats.sigma > 2
    assert stats.draft_seconds > 0 and stats.verify_seconds > 0 and stats.total_seconds >= stats.draft_seconds
    assert set(stats.as_dict()) >= {"rounds", "accepted_per_round", "sigma", "draft_seconds", "verify_seconds"}


# ----------------------------------------------------------------------------------------------- errors
def test_draft_for_another_target_is_refused_with_both_names():
    target = specvlm_hf.enable(tiny_llava())
    other = tiny_llava(vocab=64)
    other.config._name_or_path = "org/other-llava"
    draft = SpecVLMDraftModel.from_target(other)
    inputs = random_inputs(target, torch.Generator().manual_seed(0))
    with pytest.raises(DraftTargetMismatchError, match=r"org/other-llava.*vocab size 64 \(draft\) vs 96 \(target\)"):
        target.generate(**inputs, max_new_tokens=5, assistant_model=draft)


def test_hidden_size_and_architecture_mismatch_are_named():
    target = tiny_llava()
    draft = SpecVLMDraftModel.from_target(target)
    draft.config.text_config = LlamaConfig(vocab_size=96, hidden_size=32, model_type="llama")
    with pytest.raises(DraftTargetMismatchError, match="hidden size 32"):
        draft.bind_target(target)
    draft.config.text_config.hidden_size = 64
    draft.config.text_config.model_type = "mistral"
    with pytest.raises(DraftTargetMismatchError, match="text architecture 'mistral'"):
        draft.bind_target(target)


@pytest.mark.parametrize("mode", MODES)
def test_batch_size_above_one_names_the_limit(setup, mode):
    """Tree mode decodes batches (tests/test_batched.py); chain mode names the limit."""
    target, inputs = setup
    batch = {key: torch.cat([value, value]) for key, value in inputs.items()}
    if mode != "chain":
        plain = target.generate(**batch, max_new_tokens=5, do_sample=False)
        assert (
            target.generate(
                **batch,
                max_new_tokens=5,
                do_sample=False,
                assistant_model=draft_for(target, mode),
                **path_kwargs(mode),
            ).tolist()
            == plain.tolist()
        )
        return
    with pytest.raises(ValueError, match="batch size 1 \\(got 2\\)"):
        target.generate(**batch, max_new_tokens=5, assistant_model=draft_for(target, mode), **path_kwargs(mode))


def test_chain_mode_on_a_static_cache_names_the_fast_path():
    """Chain mode is transformers' assisted loop (a cache it crops): a static cache is refused with the way out."""
    from transformers import StaticCache

    target = specvlm_hf.enable(tiny_llava(scale=32.0))
    inputs = random_inputs(target, torch.Generator().manual_seed(11), text_tokens=5)
    cache = StaticCache(config=target.config, max_cache_len=64)
    for kwargs in ({"cache_implementation": "static"}, {"past_key_values": cache}):
        with pytest.raises(ValueError, match="chain mode cannot run on a static cache.*use tree mode"):
            target.generate(**inputs, max_new_tokens=5, assistant_model=draft_for(target, "chain"), **kwargs)


@pytest.mark.parametrize("mode", MODES)
def test_missing_image_is_refused(setup, mode):
    target, inputs = setup
    no_image = {key: value for key, value in inputs.items() if key != "pixel_values"}
    with pytest.raises(ValueError, match="image tokens but no image was given"):
        target.generate(**no_image, max_new_tokens=5, assistant_model=draft_for(target, mode), **path_kwargs(mode))


@pytest.mark.parametrize("mode", MODES)
def test_too_many_images_is_refused(setup, mode):
    target, inputs = setup
    two_images = dict(inputs, pixel_values=torch.cat([inputs["pixel_values"]] * 2))
    with pytest.raises(ValueError, match="1 image placeholder run\\(s\\) .* but 2 image\\(s\\) were given"):
        target.generate(**two_images, max_new_tokens=5, assistant_model=draft_for(target, mode), **path_kwargs(mode))


def test_image_without_placeholder_is_refused(setup):
    target, inputs = setup
    text_only = random_inputs(target, torch.Generator().manual_seed(1), image=False)
    with pytest.raises(ValueError, match="no image token"):
        target.generate(
            **text_only,
            pixel_values=inputs["pixel_values"],
            max_new_tokens=5,
            assistant_model=draft_for(target, "tree"),
        )


@pytest.mark.parametrize("mode", MODES)
def test_prompt_longer_than_the_positions_is_refused(setup, mode):
    target, inputs = setup
    long = dict(inputs)
    long["input_ids"] = torch.cat([inputs["input_ids"], torch.full((1, 240), 5)], dim=1)
    long["attention_mask"] = torch.ones_like(long["input_ids"])
    with pytest.raises(ValueError, match="max_position_embeddings \\(256\\)"):
        target.generate(**long, max_new_tokens=10, assistant_model=draft_for(target, mode), **path_kwargs(mode))


def test_unsupported_attention_backend_is_refused(setup):
    target, inputs = setup
    draft = draft_for(target, "tree")
    draft.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="flash_attention_2.*'sdpa'"):
        target.generate(**inputs, max_new_tokens=5, assistant_model=draft)


def test_draft_cannot_generate_alone_and_an_unenabled_target_explains():
    target = tiny_llava()
    draft = SpecVLMDraftModel.from_target(target)
    with pytest.raises(RuntimeError, match="specvlm_hf.enable\\(target\\)"):
        draft.generate(torch.ones(1, 3, dtype=torch.long))
    inputs = random_inputs(target, torch.Generator().manual_seed(0), image=False)
    with pytest.raises(RuntimeError, match="specvlm_hf.enable\\(target\\)"):
        target.generate(**inputs, max_new_tokens=5, assistant_model=draft)


def test_bad_tree_settings_are_named(setup):
    target, inputs = setup
    draft = draft_for(target, "tree")
    draft.config.tree_total_tokens = 1
    with pytest.raises(ValueError, match="tree_total_tokens >= 2"):
        target.generate(**inputs, max_new_tokens=5, assistant_model=draft)
    draft.config.tree_total_tokens = 60
    draft.config.decoding_mode = "beam"
    with pytest.raises(ValueError, match="decoding_mode must be one of"):
        target.generate(**inputs, max_new_tokens=5, assistant_model=draft)


def test_sliding_window_target_is_refused_with_the_fix():
    from transformers import LlavaConfig, LlavaForConditionalGeneration, MistralConfig

    from tiny_models import vision_config

    text = MistralConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=8,
        max_position_embeddings=256,
    )
    torch.manual_seed(0)
    target = specvlm_hf.enable(
        LlavaForConditionalGeneration(
            LlavaConfig(
                vision_config=vision_config(),
                text_config=text,
                image_token_index=95,
                image_seq_length=16,
                vision_feature_select_strategy="default",
                vision_feature_layer=-1,
            )
        ).eval()
    )
    draft = SpecVLMDraftModel.from_target(target)
    inputs = random_inputs(target, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="sliding-window.*sliding_window=None"):
        target.generate(**inputs, max_new_tokens=5, assistant_model=draft)


def test_a_draft_that_accepts_almost_nothing_warns_once(setup):
    """A draft made for another target (or untrained) makes decoding slower than plain `generate`: one warning per
    draft says so and what to do; a draft that is accepted says nothing."""
    target, inputs = setup
    torch.manual_seed(3)
    useless = SpecVLMDraftModel.from_target(target)  # fresh weights: nothing accepted
    kwargs = dict(max_new_tokens=24, min_new_tokens=24, do_sample=False)
    with pytest.warns(UserWarning, match="accepted 1.* tokens per target forward.*slower than plain"):
        target.generate(**inputs, **kwargs, assistant_model=useless)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        target.generate(**inputs, **kwargs, assistant_model=useless)  # once per draft
        target.generate(**inputs, **kwargs, assistant_model=draft_for(target, "tree"))  # accepted: no warning
