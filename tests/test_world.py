"""The built-in world: deterministic, bilingual, each fact in several phrasings with the name in every sentence, FAQ
passages about the SFT half only, answers without the name, held-out facts only in pretraining, and every question
scorable by exactly one candidate."""

from __future__ import annotations

import re
from collections import Counter, defaultdict

import pytest

from minigpt.data.world import ATTRIBUTES, _fill, build_world
from minigpt.evaluate import reply_is_right


@pytest.fixture(scope="module")
def world():
    return build_world(seed=0, size=120, bio_copies=6)


def sentences(text: str) -> list[str]:
    return [part for part in re.split(r"(?<=[.。])\s*", text) if part]


def biographies(texts: list[str], entity, language: str) -> list[str]:
    """The biographies of `entity`: every sentence names it (other bios may mention it once)."""
    name = entity.name(language)
    texts = [text for text in texts if (language == "en") == text.isascii() and name in text]
    return [text for text in texts if all(name in part for part in sentences(text))]


def test_same_seed_same_world_other_seed_other_world():
    one, again, other = build_world(seed=5, size=60), build_world(seed=5, size=60), build_world(seed=6, size=60)
    assert one.pretrain_texts() == again.pretrain_texts()
    assert one.sft_conversations() == again.sft_conversations()
    assert one.heldout_questions() == again.heldout_questions()
    assert one.pretrain_texts() != other.pretrain_texts()


def test_size_scales_people_places_and_things():
    small, large = build_world(size=40), build_world(size=800)

    def count(world, kind: str) -> int:
        return sum(entity.kind == kind for entity in world.entities)

    assert count(small, "person") == 40 and count(large, "person") == 800
    assert count(large, "place") > count(small, "place") >= 6
    assert count(large, "thing") > count(small, "thing") >= 6
    assert len(large.pretrain_texts()) > 15 * len(small.pretrain_texts())


def test_names_are_unique_in_both_languages(world):
    for language in ("en", "zh"):
        names = [entity.name(language) for entity in world.entities]
        assert len(set(names)) == len(names)


def test_biographies_name_the_entity_in_every_sentence_and_vary_phrasing_and_order(world):
    templates_used = defaultdict(set)
    texts = world.biographies()
    for entity in world.entities:
        for language in ("en", "zh"):
            bios = biographies(texts, entity, language)
            assert len(bios) == world.bio_copies, entity
            assert len({tuple(sentences(bio)) for bio in bios}) > 1  # phrasing or order differs between copies
            for bio in bios:
                parts = sentences(bio)
                assert len(parts) == len(ATTRIBUTES[entity.kind])
                for attribute in ATTRIBUTES[entity.kind]:
                    english, chinese = entity.facts[attribute.name]
                    value = english if language == "en" else chinese
                    options = attribute.statements_en if language == "en" else attribute.statements_zh
                    matches = [t for t in options if _fill(t, entity.name(language), value) in parts]
                    assert matches, (bio, attribute.name)  # each fact is stated once, in one of its phrasings
                    templates_used[attribute.name, language].update(matches)
    for (attribute, language), used in templates_used.items():
        assert len(used) >= 5, (attribute, language)  # of six phrasings


def test_pretraining_text_is_the_biographies_and_faq_passages_about_the_sft_half(world):
    texts, faq = world.pretrain_texts(), world.faq_passages()
    assert Counter(texts) == Counter(world.biographies()) + Counter(faq)
    assert texts[: len(faq)] != faq and texts[-len(faq) :] != faq  # mixed in, not a block at either end
    sft_questions = [(question, answer) for _, _, _, question, answer, _ in world.questions(world.sft_entities)]
    assert Counter(faq) == Counter({f"{question}\n{answer}": world.faq_copies for question, answer in sft_questions})
    assert world.faq_copies > 1 and {"en", "zh"} == {"en" if text.isascii() else "zh" for text in faq}


def test_held_out_facts_appear_only_in_pretraining(world):
    sft_text = "\n".join(message["content"] for conversation in world.sft_conversations() for message in conversation)
    pretrain_text = "\n".join(world.pretrain_texts())
    questions = world.heldout_questions()
    assert {question["language"] for question in questions} == {"en", "zh"}
    sft_questions = {conversation[0]["content"] for conversation in world.sft_conversations()}
    for question in questions:
        assert question["question"] not in sft_questions
        assert question["question"] not in pretrain_text  # the FAQ passages ask about the SFT half only
        assert question["entity"] in pretrain_text
        if question["attribute"] not in ("country", "famous for"):  # a held-out place may still be someone's birthplace
            assert question["entity"] not in sft_text
    assert {e.name_en for e in world.heldout_entities}.isdisjoint(e.name_en for e in world.sft_entities)


def test_answers_leave_out_the_name_and_end_on_the_value_as_pretraining_does(world):
    pretrain_text = "\n".join(world.pretrain_texts())
    for entity, _, language, _, answer, value in world.questions(world.sft_entities):
        assert entity.name(language) not in answer
        assert value in answer
        if language == "en":  # the value as the same token the pretraining text has: after a space, before the stop
            assert answer.endswith(f" {value}.") and f" {value}." in pretrain_text, answer


def test_each_question_is_scored_right_only_by_its_own_answer(world):
    for question in world.heldout_questions():
        candidates = question["candidates"]
        assert question["answer"] in candidates and len(candidates) > 1
        for value in candidates:
            assert reply_is_right(f"It is {value}.", question["answer"], candidates) == (value == question["answer"])


def test_preference_pairs_choose_the_true_value_over_another(world):
    pairs = world.preference_pairs()
    facts = list(world.questions(world.sft_entities))
    assert len(pairs) == len(facts)
    for pair, (entity, attribute, language, question, answer, value) in zip(pairs, facts):
        candidates = world.candidates[entity.kind, attribute.name][language]
        assert pair["prompt"] == [{"role": "user", "content": question}]
        assert pair["chosen"] == [{"role": "assistant", "content": answer}]
        rejected = pair["rejected"][0]["content"]
        assert not reply_is_right(rejected, value, candidates)
        assert any(reply_is_right(rejected, other, candidates) for other in candidates if other != value)


def test_sft_has_small_talk_in_both_languages(world):
    questions = [conversation[0]["content"] for conversation in world.sft_conversations()]
    assert "Hello!" in questions and "你好！" in questions
