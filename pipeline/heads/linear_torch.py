"""The linear heads' solver on a torch device (CUDA): the objectives of pipeline.heads.objectives with the same
arithmetic (float32 products, float64 scores and sums), minimised by torch's full-batch L-BFGS. Imported only where
a head runs on CUDA (pipeline.heads.linear.solver_device), or by tests on torch's CPU device."""

from __future__ import annotations

import numpy as np
import torch

from pipeline.heads.objectives import Loss, Stopping, row_blocks

# Rows per block on the device: the float64 scores of a block are ROWS x outputs; the sums over blocks are float64.
ROWS = 65536


class TorchSolver:
    """objectives.Objective and its minimisation on `device`: the rows are copied there once (on the CPU device
    they are shared, not copied), float32 stays float32."""

    def __init__(self, device: str | torch.device, x: np.ndarray, loss: Loss, mean: np.ndarray, scale: np.ndarray):
        self.device = torch.device(device)
        self.loss = loss
        self.x = self._rows(x)
        self.y = torch.from_numpy(np.asarray(loss.y, dtype=np.int64)).to(self.device)
        self.class_weight = torch.as_tensor(loss.class_weight, dtype=torch.float64, device=self.device)
        self.mean = torch.as_tensor(mean, dtype=torch.float64, device=self.device)
        self.scale = torch.as_tensor(scale, dtype=torch.float64, device=self.device)
        self._held_out: tuple[np.ndarray, torch.Tensor] | None = None

    def _rows(self, x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(x)).to(self.device)

    def _block(self, rows: slice, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """objectives.Loss.block, in torch."""
        loss, y = self.loss, self.y[rows]
        if loss.kind == "logistic":
            w = self.class_weight[y]
            if loss.n_outputs == 1:
                target, logit = (y == 1).to(torch.float64), z[:, 0]
                values = torch.nn.functional.softplus(logit) - target * logit
                return w @ values, (w * (torch.sigmoid(logit) - target))[:, None]
            log_p = torch.log_softmax(z, dim=1)
            d_z = log_p.exp()
            picked = torch.arange(len(y), device=self.device)
            d_z[picked, y] -= 1.0
            return -(w @ log_p[picked, y]), d_z * w[:, None]
        outputs = torch.arange(loss.n_outputs, device=self.device)
        positive = (y == 1)[:, None] if loss.n_outputs == 1 else y[:, None] == outputs
        sign = positive.to(torch.float64) * 2.0 - 1.0
        if loss.n_outputs == 1:
            cost = self.class_weight[y][:, None]
        else:
            cost = torch.where(positive, self.class_weight, torch.ones((), dtype=torch.float64, device=self.device))
        slack = torch.clamp(1.0 - sign * z, min=0.0)
        weighted = cost * slack
        return (weighted * slack).sum(), -2.0 * sign * weighted

    def value_and_grad(self, theta: torch.Tensor, C: float) -> tuple[torch.Tensor, torch.Tensor]:
        """objectives.Objective.__call__, in torch: theta float64 on the device."""
        loss, x = self.loss, self.x
        n_outputs, n_features = loss.n_outputs, x.shape[1]
        w, b = theta[: n_outputs * n_features].view(n_outputs, n_features), theta[n_outputs * n_features :]
        a = w / self.scale
        c = loss.bias_scale * b - a @ self.mean
        a_x = a.to(x.dtype)
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        grad_a, grad_c = torch.zeros_like(a), torch.zeros_like(c)
        for block in row_blocks(len(x), ROWS):
            rows = x[block]
            block_loss, d_z = self._block(block, (rows @ a_x.T).to(torch.float64) + c)
            total += block_loss
            grad_a += (d_z.to(x.dtype).T @ rows).to(torch.float64)
            grad_c += d_z.sum(dim=0)
        data, reg = loss.factors(C)
        grad_w = data * (grad_a - grad_c[:, None] * self.mean) / self.scale + reg * w
        grad_b = data * loss.bias_scale * grad_c + (reg * b if loss.penalise_bias else 0.0 * b)
        penalty = (w * w).sum() + ((b * b).sum() if loss.penalise_bias else 0.0)
        return data * total + 0.5 * reg * penalty, torch.cat([grad_w.reshape(-1), grad_b])

    def value(self, theta: np.ndarray, C: float) -> float:
        return float(self.value_and_grad(torch.as_tensor(theta, device=self.device), C)[0])

    def gradient_scale(self, C: float) -> float:
        size = (self.x.shape[1] + 1) * self.loss.n_outputs
        zero = torch.zeros(size, dtype=torch.float64, device=self.device)
        return float(self.value_and_grad(zero, C)[1].abs().max())

    def minimise(self, C: float, start: np.ndarray, stopping: Stopping) -> tuple[np.ndarray, int]:
        """torch.optim.LBFGS on the whole rows (one step runs the whole minimisation), from `start`: it stops when
        the largest gradient entry is below stopping.gtol (L-BFGS-B's rule, without bounds), after max_iter
        iterations, or when the objective stops moving (a change below float64's resolution of it)."""
        theta = torch.tensor(start, dtype=torch.float64, device=self.device, requires_grad=True)
        first = float(self.value_and_grad(theta.detach(), C)[0])
        optimizer = torch.optim.LBFGS(
            [theta],
            lr=1.0,
            max_iter=stopping.max_iter,
            max_eval=stopping.max_iter * 5 // 4,
            tolerance_grad=stopping.gtol,
            tolerance_change=64 * np.finfo(float).eps * max(abs(first), 1.0),
            history_size=10,  # scipy's default (maxcor)
            line_search_fn="strong_wolfe",
        )

        def closure() -> torch.Tensor:
            value, grad = self.value_and_grad(theta.detach(), C)
            theta.grad = grad
            return value

        optimizer.step(closure)
        n_iter = int(optimizer.state[theta].get("n_iter", 0))
        return theta.detach().cpu().numpy(), n_iter

    def scores(self, x: np.ndarray, a: np.ndarray, c: np.ndarray) -> np.ndarray:
        """x @ a.T + c in float64 [N, P], on the device (the held-out rows copied there once per sweep)."""
        if self._held_out is None or self._held_out[0] is not x:
            self._held_out = (x, self._rows(x))
        rows = self._held_out[1]
        a_x = torch.as_tensor(a, device=self.device).to(rows.dtype)
        out = torch.cat([(rows[block] @ a_x.T).to(torch.float64) for block in row_blocks(len(rows), ROWS)])
        return (out + torch.as_tensor(c, device=self.device)).cpu().numpy()
