import json
from pathlib import Path

from dori.testbed.tokenizer import BOS_TOKEN_ID, EOS_TOKEN_ID, MAX_LENGTH


def test_ids_match_openai_simple_tokenizer(clip_tokenizer):
    fixture = json.loads((Path(__file__).parent / "fixtures" / "clip_token_ids.json").read_text())
    for case in fixture["cases"]:
        assert clip_tokenizer(case["text"]).input_ids == case["ids"], case["text"]


def test_vocabulary_and_special_tokens(clip_tokenizer):
    assert len(clip_tokenizer) == 49408
    assert clip_tokenizer.bos_token_id == BOS_TOKEN_ID
    assert clip_tokenizer.eos_token_id == EOS_TOKEN_ID == clip_tokenizer.pad_token_id
    padded = clip_tokenizer("a cat", padding="max_length", truncation=True).input_ids
    assert len(padded) == MAX_LENGTH and padded[-1] == EOS_TOKEN_ID
    long = clip_tokenizer("word " * 200, padding="max_length", truncation=True).input_ids
    assert len(long) == MAX_LENGTH and long[-1] == EOS_TOKEN_ID
