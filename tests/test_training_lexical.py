"""The lexical branch (training.lexical): a bag-of-word-pieces classifier whose logits are added to
the encoder's inside the exported graph."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from models.runtime import OnnxTextEncoder
from tests.test_training_finetune import LABELS, TEXTS
from training.export import check_export, export_onnx, parity, quantize, save_tokenizer
from training.lexical import LexicalConfig, LexicalHead, choose_mix, lexical_logits, train_lexical
from training.model import (
    EncoderClassifier,
    collate,
    default_base_model,
    encode,
    load_tokenizer,
    pad_id_of,
    predict_logits,
)

MAX_LENGTH = 32


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(default_base_model(), MAX_LENGTH)


@pytest.fixture(scope="module")
def fitted(tok):
    """A lexical head fitted to the 16 texts, and its training summary."""
    torch.set_num_threads(2)
    head = LexicalHead(tok.get_vocab_size(), 32, 4, token_dropout=0.1)
    ids = encode(tok, TEXTS)
    res = train_lexical(head, ids, LABELS, ids, LABELS, pad_id_of(tok),
                        LexicalConfig(dim=32, epochs=30, lr=3e-2, batch_size=8, progress=False))
    return head, res


def test_lexical_head_pools_a_length_normalised_bag_and_ignores_padding(tok):
    head = LexicalHead(tok.get_vocab_size(), 8, 3).eval()
    ids = encode(tok, ["left knee pain", "left knee pain with a much longer history"])
    one = head(*collate(ids[:1], pad_id_of(tok)))
    padded = head(*collate(ids, pad_id_of(tok)))[:1]  # the short text padded to the long one's width
    assert torch.allclose(one, padded, atol=1e-6)
    with torch.no_grad():
        bag = head.embedding(torch.tensor(ids[0])).sum(0) / len(ids[0]) ** 0.5
        assert torch.allclose(one[0], head.out(bag), atol=1e-5)
    assert "mix" in dict(head.named_buffers()) and float(head.mix) == 1.0


def test_token_dropout_acts_only_in_training(tok):
    head = LexicalHead(tok.get_vocab_size(), 8, 3, token_dropout=0.5)
    batch = collate(encode(tok, TEXTS), pad_id_of(tok))
    head.eval()
    assert torch.equal(head(*batch), head(*batch))
    head.train()
    torch.manual_seed(0)
    assert not torch.allclose(head(*batch), head(*batch))


def test_lexical_training_fits_the_texts(fitted, tok):
    head, res = fitted
    assert res.steps == 30 * 2 and len(res.val_accuracy) == 30
    assert res.val_accuracy[-1] == 1.0 and res.val_accuracy[0] < 1.0
    pred = lexical_logits(head, encode(tok, TEXTS), pad_id_of(tok)).argmax(1)
    assert (pred == np.asarray(LABELS)).all()


def test_bad_arguments_are_refused(tok):
    with pytest.raises(ValueError, match="token_dropout"):
        LexicalHead(10, 4, 2, token_dropout=1.0)
    with pytest.raises(ValueError, match="as many labels as texts"):
        train_lexical(LexicalHead(tok.get_vocab_size(), 4, 2), [[101, 102]], [0, 1], [], [], 0,
                      LexicalConfig(epochs=1, progress=False))


def test_choose_mix_uses_an_informative_branch_and_drops_a_useless_one():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, 400)
    encoder = rng.normal(size=(400, 5))
    encoder[np.arange(400), y] += 1.0  # a weak encoder
    informative = rng.normal(size=(400, 5))
    informative[np.arange(400), y] += 3.0
    w, scores = choose_mix(encoder, informative, y)
    assert w > 0 and scores[w] > scores[0.0] + 0.1
    w_noise, scores_noise = choose_mix(encoder, rng.normal(size=(400, 5)) * 10, y)
    assert scores_noise[w_noise] >= scores_noise[0.0]
    assert w_noise < w


def test_encoder_with_lexical_branch_exports_and_quantizes_with_parity(fitted, tok, tmp_path):
    head, _ = fitted
    model = EncoderClassifier.from_pretrained(default_base_model(), 4, num_layers=1, dropout=0.0).eval()
    ids = encode(tok, TEXTS)
    alone = predict_logits(model, ids, pad_id_of(tok))
    head.mix.fill_(2.0)
    model.lexical = head.eval()
    combined = predict_logits(model, ids, pad_id_of(tok))
    np.testing.assert_allclose(combined, alone + 2.0 * lexical_logits(head, ids, pad_id_of(tok)), atol=1e-4)
    fp32 = export_onnx(model, tmp_path / "fp32.onnx")
    assert check_export(model, fp32, ids, pad_id_of(tok)) < 1e-3
    int8 = quantize(fp32, tmp_path / "int8.onnx", embeddings="int8")
    tok_path = save_tokenizer(tok, tmp_path / "tokenizer.json", MAX_LENGTH)
    batch = TEXTS * 2 + [t.upper() for t in TEXTS]
    served = OnnxTextEncoder(int8, tok_path, MAX_LENGTH)
    agreement = parity(OnnxTextEncoder(fp32, tok_path, MAX_LENGTH).logits(batch), served.logits(batch))
    assert agreement["top1_agreement"] >= 0.99, agreement
    assert (served.logits(TEXTS).argmax(1) == np.asarray(LABELS)).all()  # the lexical branch decides here
    # the lexical table alone in 4-bit blocks (the protocol default): every other table stays int8,
    # the file shrinks, and the served model still agrees with fp32
    lex4 = quantize(fp32, tmp_path / "lex4.onnx", embeddings="int8", lexical="int4")
    graph = onnx.load(str(lex4)).graph
    blocks = [n.input[0] for n in graph.node if n.op_type == "GatherBlockQuantized"]
    assert len(blocks) == 1 and "lexical" in blocks[0], blocks
    assert any(n.op_type == "Gather" and "word_embeddings" in n.input[0] for n in graph.node)
    assert lex4.stat().st_size < int8.stat().st_size
    served4 = OnnxTextEncoder(lex4, tok_path, MAX_LENGTH)
    agreement4 = parity(OnnxTextEncoder(fp32, tok_path, MAX_LENGTH).logits(batch), served4.logits(batch))
    assert agreement4["top1_agreement"] >= 0.95, agreement4
