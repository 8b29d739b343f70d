"""kernels/spec_verify.py against its torch reference, plus the acceptance rule itself.

CPU runs the kernel through TRITON_INTERPRET (tests/kernels/conftest.py); the same tests
run on a GPU under `-m gpu` (the `gpu`-marked copy below).
"""

import pytest
import torch

from kernels.spec_verify import spec_verify, spec_verify_reference


def _case(b, k, v, device, sampled, has_q, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, k + 1, v, generator=g) * 3
    drafts = torch.randint(0, v, (b, k), generator=g)
    # make some drafts the argmax so greedy rows accept a few
    take = torch.rand(b, k, generator=g) < 0.6
    drafts = torch.where(take, logits[:, :k].argmax(-1), drafts)
    lens = torch.randint(0, k + 1, (b,), generator=g)
    temp = torch.where(torch.rand(b, generator=g) < 0.5, 0.0, 0.7) if sampled else torch.zeros(b)
    q = torch.softmax(torch.randn(b, k, v, generator=g), -1) if has_q else None
    u = torch.rand(b, k + 1, generator=g) if sampled else None
    noise = torch.empty(b, k + 1, v).exponential_(generator=g) if sampled else None
    args = (logits, drafts, lens, temp.float(), q, u, noise)
    return [a.to(device) if a is not None else None for a in args]


@pytest.mark.parametrize("sampled,has_q", [(False, False), (True, False), (True, True)])
def test_kernel_matches_reference(device, sampled, has_q):
    args = _case(6, 3, 300, device, sampled, has_q)
    out, num = spec_verify(*args)
    ref_out, ref_num = spec_verify_reference(*args)
    assert torch.equal(num.cpu(), ref_num.cpu())
    assert torch.equal(out.cpu(), ref_out.cpu())


def test_greedy_rule(device):
    """Accepted = leading drafts equal to the argmax, then the argmax at the first miss."""
    logits, drafts, lens, temp, *_ = _case(8, 4, 257, device, False, False, seed=3)
    out, num = spec_verify(logits, drafts, lens, temp)
    top = logits.argmax(-1).cpu()
    for b in range(8):
        a = 0
        while a < int(lens[b]) and int(drafts[b, a]) == int(top[b, a]):
            a += 1
        assert int(num[b]) == a
        assert out[b, :a].tolist() == drafts[b, :a].tolist()
        assert int(out[b, a]) == int(top[b, a])
        assert (out[b, a + 1 :] == -1).all()


def test_bad_shapes_raise(device):
    logits, drafts, lens, temp, *_ = _case(2, 2, 16, device, False, False)
    with pytest.raises(ValueError, match="draft_tokens"):
        spec_verify(logits, drafts[:, :1].contiguous(), lens, temp)
    with pytest.raises(ValueError, match="uniform and noise"):
        spec_verify(logits, drafts, lens, temp, None, torch.rand(2, 3, device=device), None)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("sampled,has_q", [(False, False), (True, False), (True, True)])
def test_kernel_matches_reference_gpu_large_vocab(sampled, has_q):
    args = _case(32, 4, 49152, "cuda", sampled, has_q)
    out, num = spec_verify(*args)
    ref_out, ref_num = spec_verify_reference(*args)
    assert torch.equal(num.cpu(), ref_num.cpu())
    assert torch.equal(out.cpu(), ref_out.cpu())
