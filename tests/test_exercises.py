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
