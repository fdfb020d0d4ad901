"""RAML with and without the RAML / D3still code's eps (1e-6 inside each square): loss, gradient norm and
finiteness at q = g, in a training-like state and in degenerate cases (issue 11, item 4; docs/reid.md).

    python experiments/raml_eps.py

float64, B = 256, D = 512 (the distillation batch and the BN-neck's width); both sides with the paper's λ2,
so that only the eps differs. Prints a markdown table.
"""

from __future__ import annotations

import torch

from asymret.training.losses import LossBatch, create_loss


def loss_and_grad(loss, q: torch.Tensor, g: torch.Tensor) -> tuple[float, torch.Tensor]:
    q = q.clone().requires_grad_()
    total = loss(LossBatch(query_raw=q, gallery_raw=g)).total
    (grad,) = torch.autograd.grad(total, q)
    return total.item(), grad


def main() -> None:
    torch.manual_seed(0)
    paper, code = create_loss("raml"), create_loss("raml", compat=True)
    code.lambda2 = paper.lambda2  # compat also sets λ2 := λ1; keep only the eps apart
    b, d = 256, 512
    g = torch.randn(b, d, dtype=torch.float64)
    cases = {
        "q = g": g.clone(),
        "q = 3g (same directions)": 3 * g,
        "q = g + 0.1·noise": g + 0.1 * torch.randn(b, d, dtype=torch.float64),
        "q = g + noise (training-like)": g + torch.randn(b, d, dtype=torch.float64),
        "q = −g": -g,
        "one zero row in q": torch.cat([torch.zeros(1, d, dtype=torch.float64), g[1:]]),
    }
    print("| case | loss, paper | loss, eps | relative difference | ‖∂L/∂q‖, paper | ‖∂L/∂q‖, eps | finite |")
    print("|---|---|---|---|---|---|---|")
    for name, q in cases.items():
        lp, gp = loss_and_grad(paper, q, g)
        lc, gc = loss_and_grad(code, q, g)
        rel = f"{abs(lc - lp) / abs(lp):.1e}" if abs(lp) > 1e-20 else "-"
        finite = bool(torch.isfinite(gp).all() and torch.isfinite(gc).all())
        print(f"| {name} | {lp:.6g} | {lc:.6g} | {rel} | {gp.norm():.4g} | {gc.norm():.4g} | {finite} |")


if __name__ == "__main__":
    main()
