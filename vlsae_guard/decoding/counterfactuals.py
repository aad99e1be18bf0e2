"""The counterfactual inputs of arm *b*: VCD's diffusion-noised image and M3ID's prompt without
the image. Pure functions; the decoding engine feeds their results to the second arm."""

from __future__ import annotations

import torch

IMAGE_PLACEHOLDER = "<image>"
NOISE_STEPS = 1000


def noise_schedule(num_steps: int = NOISE_STEPS) -> torch.Tensor:
    """``alpha_bar_t = prod_{s<=t} (1 - beta_s)`` for t = 0 .. num_steps - 1 (float32).

    VCD's schedule (DAMO-NLP-SG/VCD ``vcd_utils/vcd_add_noise.py``): not the linear or cosine
    DDPM schedule but a sigmoid one, ``beta_t = sigmoid(linspace(-6, 6, num_steps)_t)
    * (5e-3 - 1e-5) + 1e-5``, in float32 as there. Beta rises from about 1e-5 to 5e-3, so
    ``alpha_bar`` is 0.99998 at step 0, about 0.745 at step 500 (VCD's default) and 0.081 at 999.
    """
    ramp = torch.sigmoid(torch.linspace(-6.0, 6.0, num_steps, dtype=torch.float32))
    betas = ramp * (0.5e-2 - 1e-5) + 1e-5
    return torch.cumprod(1.0 - betas, dim=0)


def diffusion_noise(pixels: torch.Tensor, noise_step: int, seed: int) -> torch.Tensor:
    """VCD's distorted image: the forward diffusion ``q(x_t | x_0)`` at ``noise_step``,
    ``sqrt(alpha_bar_t) * x_0 + sqrt(1 - alpha_bar_t) * eps`` with ``eps ~ N(0, I)``.

    ``pixels`` is the processor's output (CLIP-normalised, as in VCD's
    ``experiments/eval/object_hallucination_vqa_llava.py``, which noises
    ``image_processor.preprocess(...)['pixel_values']``), any shape. Deviations: ``eps`` comes
    from a CPU generator seeded with ``seed`` (the same draw on every device), not from the
    global RNG; the result keeps ``pixels``' dtype and device (VCD returns float32 and casts
    to fp16 at the call).
    """
    if not 0 <= noise_step < NOISE_STEPS:
        raise ValueError(
            f"noise_step indexes VCD's {NOISE_STEPS} diffusion steps: expected 0 .. "
            f"{NOISE_STEPS - 1}, found {noise_step}"
        )
    alpha_bar = noise_schedule()[noise_step].item()
    generator = torch.Generator().manual_seed(seed)
    eps = torch.randn(pixels.shape, generator=generator, dtype=torch.float32)
    x0 = pixels.detach().float().cpu()
    noised = alpha_bar**0.5 * x0 + (1.0 - alpha_bar) ** 0.5 * eps
    return noised.to(dtype=pixels.dtype, device=pixels.device)


def without_image(prompt: str, placeholder: str = IMAGE_PLACEHOLDER) -> str:
    """M3ID's unconditioned prompt: the LLaVA conversation with every image placeholder removed
    and nothing else changed (``"USER: <image>\\nWhat is here? ASSISTANT:"`` becomes
    ``"USER: \\nWhat is here? ASSISTANT:"``).

    This is what the M3ID reimplementation of sangminwoo/AvisC does to token ids (it drops the
    image token, -200, and keeps its neighbours). A prompt with no placeholder is refused: its
    counterfactual would be arm *a* itself and the contrast silently zero. Note that LLaVA
    tokenises the text around a placeholder in separate pieces, so where the engine holds token
    ids, dropping the image token id there is the exact counterpart of this string function.
    """
    if placeholder not in prompt:
        raise ValueError(f"the prompt has no image placeholder {placeholder!r}: {prompt!r}")
    return prompt.replace(placeholder, "")
