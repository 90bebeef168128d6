"""webuiproc.checkout_reachable: the directories above a checkout get o+x for the block
(a UI dropped to an unprivileged user runs the checkout's venv), and their modes back."""
import os
import stat

from webuiproc import checkout_reachable


def mode(p):
    return stat.S_IMODE(p.stat().st_mode)


def test_adds_only_the_missing_search_bit_and_puts_modes_back(tmp_path):
    closed, open_, checkout = tmp_path / "closed", tmp_path / "closed" / "open", tmp_path / "closed" / "open" / "repo"
    checkout.mkdir(parents=True)
    os.chmod(closed, 0o700)
    os.chmod(open_, 0o751)
    before = mode(tmp_path)
    with checkout_reachable(checkout) as changed:
        assert closed in changed and open_ not in changed
        assert mode(closed) == 0o701 and mode(open_) == 0o751
        assert all(mode(d) & stat.S_IXOTH for d in checkout.parents)
    assert mode(closed) == 0o700 and mode(open_) == 0o751 and mode(tmp_path) == before


def test_a_checkout_that_is_itself_0700_is_opened_too(tmp_path):
    checkout = tmp_path / "repo"
    checkout.mkdir()
    os.chmod(checkout, 0o700)
    with checkout_reachable(checkout) as changed:
        assert checkout in changed and mode(checkout) == 0o701
    assert mode(checkout) == 0o700


def test_modes_come_back_when_the_block_fails(tmp_path):
    checkout = tmp_path / "closed" / "repo"
    checkout.mkdir(parents=True)
    os.chmod(tmp_path / "closed", 0o700)
    try:
        with checkout_reachable(checkout):
            raise RuntimeError("the test failed")
    except RuntimeError:
        pass
    assert mode(tmp_path / "closed") == 0o700
