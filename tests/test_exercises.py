from pefttutor.exercises import Exercise, close_to


def make():
    return Exercise("add", lambda a: a == 4, hint="2 + 2", solution="answer = 4")


def test_unattempted_does_not_fail(capsys):
    assert make().check(...) is None and make().check(None) is None
    assert "not attempted" in capsys.readouterr().out


def test_right_and_wrong(capsys):
    assert make().check(4) is True
    assert "correct" in capsys.readouterr().out
    assert make().check(5) is False
    assert "not quite" in capsys.readouterr().out


def test_checker_messages_and_errors(capsys):
    def checker(a):
        assert a > 0, "must be positive"
        return True

    ex = Exercise("pos", checker, hint="h", solution="s")
    assert ex.check(-1) is False and "must be positive" in capsys.readouterr().out
    assert ex.check("x") is False and "TypeError" in capsys.readouterr().out
    ex.hint()
    ex.solution()
    out = capsys.readouterr().out
    assert "h" in out and "s" in out


def test_close_to():
    ex = Exercise("pi", close_to(3.14159, rel=1e-3), hint="", solution="")
    assert ex.check(3.1416) is True
    assert ex.check(3.2) is False


def test_notebook00_checkers_right_and_wrong(capsys):
    from pefttutor.exercises import models_and_data as nb00
    from pefttutor.models import Llama, LlamaConfig

    cfg = LlamaConfig()
    assert nb00.llama_block_params(cfg) == 3_540_096
    tiny = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=4)
    real = sum(p.numel() for p in Llama(tiny).model.layers[0].parameters())
    assert nb00.llama_block_params(tiny) == real  # the formula, checked against a real block
    ex = nb00.block_params(cfg)
    assert ex.check(2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536 + 2 * 576) is True
    assert ex.check(2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536) is False
    share = nb00.embedding_share(134_515_008)
    assert share.check(49152 * 576 / 134_515_008) is True
    assert share.check(0.5) is False
    assert share.check(...) is None


def test_notebook01_checkers_right_and_wrong(capsys):
    from pefttutor.exercises import introduction as nb01
    from pefttutor.models import Bert, BertConfig

    assert nb01.adam_memory_13b().check(208) is True
    assert nb01.adam_memory_13b().check(52) is False
    assert nb01.fits("lora") and not nb01.fits("full")
    assert nb01.what_fits_24gb().check("lora") is True
    assert nb01.what_fits_24gb().check("full") is False
    block = sum(p.numel() for p in Bert(BertConfig(hidden_size=384, num_hidden_layers=1, num_attention_heads=12,
                                                   intermediate_size=1536)).encoder.layer[0].parameters())
    ex = nb01.minilm_block_params(block)
    assert ex.check(4 * (384 * 384 + 384) + (384 * 1536 + 1536) + (1536 * 384 + 384) + 2 * 2 * 384) is True
    assert ex.check(4 * 384 * 384 + 2 * 384 * 1536) is False


def test_conclusion_exercises(capsys):
    from pefttutor.exercises import conclusion as c

    assert c.llama_adapter_7b.check(30 * (10 * 4096 + 32)) is True
    assert c.llama_adapter_7b.check(30 * 10 * 4096) is False
    runs = {"full finetuning": [{"accuracy": 0.78, "file_bytes": 90e6}, {"accuracy": 0.76, "file_bytes": 90e6}],
            "LoRA": [{"accuracy": 0.76, "file_bytes": 300e3}],
            "head only": [{"accuracy": 0.66, "file_bytes": 5e3}]}
    ex = c.smallest_close_to_full(runs)
    assert ex.check("LoRA") is True and ex.check("head only") is False
    assert c.largest_fitting_rank(budget_gb=131) == 0 or c.largest_fitting_rank(budget_gb=131) < 30
    r = c.largest_fitting_rank()
    assert c.lora_65b_rank.check(r) is True and c.lora_65b_rank.check(r + 1) is False
    assert c.lora_65b_rank.check(None) is None
    assert "not attempted" in capsys.readouterr().out
