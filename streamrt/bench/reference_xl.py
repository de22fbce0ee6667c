"""The SDXL rows' reference: diffusers' ``StableDiffusionXLImg2ImgPipeline`` over the run's SDXL modules.

StreamDiffusion 0.1.1 has no SDXL path, so what a user would otherwise pick for realtime SDXL img2img is
diffusers' own pipeline with an SDXL-turbo-style one-step call. It is built from the SAME modules as our
stream (UNet, both text encoders and tokenizers) with the TAESD (TAESDXL's architecture) as its ``vae``,
in the run's dtype, with diffusers' default attention processors (``AttnProcessor2_0``: SDPA).

How one call is made, and why:

- ``num_inference_steps=2, strength=0.5``: img2img runs ``int(num_inference_steps * strength)`` of the
  schedule's steps (diffusers' ``get_timesteps``), so this is exactly ONE UNet step (at t = 499 of a two-step
  LCM schedule; our stream's step is at t index 32 of 50, t = 359; the cost of a step does not depend on t).
  ``num_inference_steps * strength`` must be >= 1 or the pipeline runs no step. The bench counts the UNet
  calls with a forward hook over the warm-up calls (``ref_unet_calls_per_call``), and the CPU test checks it.
- ``guidance_scale=0``: no classifier-free guidance (one UNet row per frame, like our ``cfg none``).
- ``prompt_embeds`` / ``pooled_prompt_embeds`` encoded once before the first call (in the first-call time),
  repeated for the F frames of a call: our stream also encodes its prompt once at setup, and a user calling
  the pipeline per frame would pass embeddings rather than re-encode the same prompt every frame.
- ``output_type="pt"``: the decoded images in [0, 1] as a device tensor; the row then moves them to a CPU
  IMAGE batch like the StreamDiffusion rows, so both sides are image in, image out.
- its own ``LCMScheduler`` (same config as the shared one): the pipeline sets timesteps on its scheduler at
  every call, and the streams build their schedules from the shared one.
- the progress bar is off and no watermark is applied (a realtime caller would turn both off).
"""

from __future__ import annotations

import torch

from .common import PROMPT, BenchContext, Scenario

#: img2img runs int(STEPS * STRENGTH) denoising steps: exactly one
STEPS = 2
STRENGTH = 0.5
GUIDANCE_SCALE = 0.0


class XLReference:
    """``StableDiffusionXLImg2ImgPipeline`` over the run's SDXL components: F frames per call, one UNet step."""

    def __init__(self, ctx: BenchContext, sc: Scenario) -> None:
        from diffusers import LCMScheduler, StableDiffusionXLImg2ImgPipeline

        if int(STEPS * STRENGTH) != 1:
            raise ValueError(f"num_inference_steps={STEPS} x strength={STRENGTH} must give one step")
        c = ctx.components(sc)
        self.ctx, self.f = ctx, sc.frames_per_step
        self.unet = c["unet"]
        self.pipe = StableDiffusionXLImg2ImgPipeline(
            vae=c["taesd"], text_encoder=c["text_encoder"], text_encoder_2=c["text_encoder_2"],
            tokenizer=c["tokenizer"], tokenizer_2=c["tokenizer_2"], unet=c["unet"],
            scheduler=LCMScheduler.from_config(c["scheduler"].config), add_watermarker=False)
        self.pipe.set_progress_bar_config(disable=True)
        self.embeds: torch.Tensor | None = None
        self.pooled: torch.Tensor | None = None

    def prepare(self) -> None:
        """Encode the prompt once, for F images per call (the pipeline's own encoder path)."""
        embeds, _, pooled, _ = self.pipe.encode_prompt(PROMPT, device=self.ctx.device, num_images_per_prompt=self.f,
                                                       do_classifier_free_guidance=False)
        self.embeds, self.pooled = embeds, pooled

    def frame(self, src: torch.Tensor, dst: torch.Tensor) -> torch.Size:
        """One call: upload ``src`` [F, H, W, 3], run the pipeline, write IMAGE layout into CPU ``dst``; returns
        the shape the pipeline gave ([F, 3, H, W])."""
        x = src.to(self.ctx.device, non_blocking=True).permute(0, 3, 1, 2)  # [F, 3, H, W] in [0, 1]
        y = self.pipe(image=x, prompt_embeds=self.embeds, pooled_prompt_embeds=self.pooled, strength=STRENGTH,
                      num_inference_steps=STEPS, guidance_scale=GUIDANCE_SCALE, output_type="pt",
                      return_dict=False)[0]                                 # [F, 3, H, W] in [0, 1]
        dst.copy_(y.permute(0, 2, 3, 1).float())
        return y.shape
