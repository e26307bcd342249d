"""Shared training helpers of markbench.training, checked against the hand-written code they replace."""


def test_optimizer_step_matches_the_hand_written_step_with_and_without_clipping():
    import torch

    from markbench.training import optimizer_step

    for clip in (0.0, 0.05):
        torch.manual_seed(0)
        a = torch.nn.Linear(4, 3)
        b = torch.nn.Linear(4, 3)
        b.load_state_dict(a.state_dict())
        x = torch.randn(8, 4)
        oa, ob = torch.optim.AdamW(a.parameters(), lr=0.1), torch.optim.AdamW(b.parameters(), lr=0.1)
        sa = torch.optim.lr_scheduler.LambdaLR(oa, lambda s: 0.5 ** s)
        sb = torch.optim.lr_scheduler.LambdaLR(ob, lambda s: 0.5 ** s)
        for _ in range(3):
            optimizer_step(oa, (a(x) ** 2).sum(), list(a.parameters()), clip, sa)
            ob.zero_grad(set_to_none=True)
            (b(x) ** 2).sum().backward()
            if clip > 0:
                torch.nn.utils.clip_grad_norm_(list(b.parameters()), clip)
            ob.step()
            sb.step()
        assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
        assert sa.get_last_lr() == sb.get_last_lr() == [0.1 * 0.5 ** 3]  # the schedule stepped each time
    # clipping changes the update (the test above would pass for a no-op clip otherwise)
    torch.manual_seed(0)
    c, d = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    d.load_state_dict(c.state_dict())
    x = torch.randn(8, 4)
    optimizer_step(torch.optim.SGD(c.parameters(), lr=0.1), (c(x) ** 2).sum(), list(c.parameters()), 0.01)
    optimizer_step(torch.optim.SGD(d.parameters(), lr=0.1), (d(x) ** 2).sum(), list(d.parameters()), 0.0)
    assert not torch.equal(c.weight, d.weight)
