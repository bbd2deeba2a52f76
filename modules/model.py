"""The conditional VAE: the lab's five modules, the per-frame step, the training pass and the
rollout. Trainer, Tester and the benchmark all call these; nothing else re-implements them.

Shapes: B batch, T frames, C=3, H x W the frame size, N the latent channels.
Images are float in [0, 1]. Per-sequence state is passed in and returned, never stored here.
"""
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .modules import Decoder_Fusion, Gaussian_Predictor, Generator, Label_Encoder, RGB_Encoder

Z_MODES = ("sample", "zero", "prior_mean")
PRIORS = ("fixed", "learned")
RECONS = ("mse", "l1")
CONDITIONS = ("previous", "first")


def kl_standard_normal(mu, logvar):
    """KL(N(mu, exp(logvar)) || N(0, I)), elementwise."""
    # expm1: exp(logvar) - 1 - logvar in float32 rounds to small negative values near logvar = 0.
    return 0.5 * (mu.pow(2) + torch.expm1(logvar) - logvar)


def kl_gaussians(mu_q, logvar_q, mu_p, logvar_p):
    """KL(N(mu_q, exp(logvar_q)) || N(mu_p, exp(logvar_p))), elementwise (SVG-LP's analytic KL)."""
    d = logvar_q - logvar_p
    return 0.5 * (torch.expm1(d) - d + (mu_q - mu_p).pow(2) / logvar_p.exp())


# Pixels of flow per unit of the flow convolution's output. With 1, a displacement of tens of
# pixels needed features in the tens on the Decoder_Fusion output, which the Generator shares, and
# its four gated blocks (products of two convolutions) turned such inputs into outputs in the
# millions: single-step loss spikes (CPU, reproduced; docs/RESULTS.md) and, on an H100 at the lab's
# dims, a run that diverged. With 16 the same flows need features near 1.
FLOW_SCALE = 16.0


# pose_flow's coarse flow works on COARSE x COARSE averages. Every module keeps the full
# resolution, and the flow convolution sees the poses only as far as the encoders reach (about 13
# pixels around a pixel at 32 x 64); the dancer moves up to 30 pixels from where the first frame
# has them. At a quarter of the size four convolutions (one dilated) reach about 40 pixels.
COARSE = 4
# The match compares every MATCH_BLOCK x MATCH_BLOCK block of pose t with every block of the first
# pose. Limbs are a few pixels wide: on 4 x 4 blocks the dancer the match carries moved by whole
# blocks' displacements (CPU-sized runs: 2 x 2 blocks train to a lower error and score higher;
# docs/RESULTS.md). Stored in the model as the buffer `match_block`; checkpoints written before
# it match 4 x 4 blocks.
MATCH_BLOCK = 2
MATCH_DIM = 32  # channels of the pose matching's queries and keys
# The dancer layer's mask starts at sigmoid(-4) = 0.018: the untrained model is within 2 % of the one
# without it, and the mask can learn from the first step everywhere. (A mask clamped to [0, 1]
# starting at exactly zero would be pushed below zero, and stop learning, wherever the untrained
# match is wrong.)
MASK_START = -4.0


def coarse_flow_net(channels):
    """Averaged features and the pose match's displacement -> a flow at COARSE x COARSE blocks; the
    last layer starts at zero, so the untrained model's flow is the fine one alone."""
    net = nn.Sequential(
        nn.Conv2d(channels, channels, 3, padding=1), nn.LeakyReLU(0.1),
        nn.Conv2d(channels, channels, 3, padding=2, dilation=2), nn.LeakyReLU(0.1),
        nn.Conv2d(channels, channels, 3, padding=1), nn.LeakyReLU(0.1),
        nn.Conv2d(channels, 2, 3, padding=1),
    )
    nn.init.zeros_(net[-1].weight)
    nn.init.zeros_(net[-1].bias)
    return net


def build_model(a):
    """The model that a dict of arguments describes: the Trainer's flags (vars(args)) or those
    stored in a checkpoint. Options missing from older checkpoints take their defaults."""
    return VAE_Model(a["F_dim"], a["L_dim"], a["N_dim"], a["D_out_dim"], prior=a.get("prior") or "fixed",
                     residual=bool(a.get("residual")), condition=a.get("condition") or "previous",
                     first_pose=bool(a.get("first_pose")), warp=bool(a.get("warp")),
                     pose_flow=bool(a.get("pose_flow")), lab_activation=bool(a.get("lab_activation")))


def gather(img, attn, block):
    """img (B, C, H, W) read through pose_flow's match: every block x block block of the result is
    the attention-weighted mean of img's blocks, pixel for pixel (pixel (i, j) of a block from
    pixels (i, j) of the blocks it attends to). attn (B, hw, hw) over the blocks in row-major order,
    as the match pools them (ceil_mode: a frame the block does not divide is padded by repeating its
    edges, and the result cropped back). In at least float32."""
    H, W = img.shape[-2:]
    dtype = torch.promote_types(img.dtype, attn.dtype)
    img = img.to(dtype)
    pad_h, pad_w = -H % block, -W % block
    if pad_h or pad_w:
        img = F.pad(img, (0, pad_w, 0, pad_h), mode="replicate")
    patches = F.unfold(img, block, stride=block).transpose(1, 2)  # (B, hw, C * block * block)
    with _autocast_off(attn):
        out = F.fold((attn.to(dtype) @ patches).transpose(1, 2), img.shape[-2:], block, stride=block)
    return out[..., :H, :W]


def warp(img, flow):
    """img (B, C, H, W) read at every pixel's position moved by flow (B, 2, H, W), in pixels (x
    right, y down), bilinearly, edges repeated outside the frame. Zero flow returns img. In at
    least float32 whatever the autocast dtype: bfloat16 coordinates would round to a quarter pixel
    near the right edge of a 64-pixel frame."""
    B, _, H, W = img.shape
    dtype = torch.promote_types(torch.promote_types(img.dtype, flow.dtype), torch.float32)
    img, flow = img.to(dtype), flow.to(dtype)
    y, x = torch.meshgrid(torch.arange(H, device=img.device, dtype=dtype),
                          torch.arange(W, device=img.device, dtype=dtype), indexing="ij")
    # grid_sample's coordinates: -1 and 1 are the outer edges of the corner pixels (align_corners=False).
    gx = (x + flow[:, 0] + 0.5) * (2.0 / W) - 1.0
    gy = (y + flow[:, 1] + 0.5) * (2.0 / H) - 1.0
    return F.grid_sample(img, torch.stack([gx, gy], -1), mode="bilinear", padding_mode="border",
                         align_corners=False)


# Blurs (Gaussian sigma in pixels, 0 = none) at which the warp's own loss compares the warped frame
# with the true one. A bilinear warp's gradient sees one pixel around each sampling point: on a
# plain wall it is zero, so a flow that misses a dancer a few pixels wide is never pulled towards
# them. Blurred, the dancer's edges reach several pixels further.
WARP_BLURS = (0, 1, 2, 4)


def _autocast_off(t):
    """A region where t's device computes in the dtypes it is given: autocast would run matrix
    products and convolutions in bfloat16 even on float32 inputs, where the code documents float32."""
    return torch.autocast(device_type=t.device.type, enabled=False)


def blur(x, sigma):
    """x (B, C, H, W) convolved with a Gaussian of sigma pixels (edges repeated); sigma 0 returns x."""
    if sigma == 0:
        return x
    r = int(3 * sigma)
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=x.dtype, device=x.device) / sigma) ** 2)
    k = k / k.sum()
    C = x.shape[1]
    x = F.conv2d(F.pad(x, (r, r, r, r), mode="replicate"), k.view(1, 1, 1, -1).expand(C, 1, 1, -1), groups=C)
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(C, 1, -1, 1), groups=C)


class DancerLayer(NamedTuple):
    """pose_flow's second layer, as _decode returns it: the match's displacement in pixels
    (B, 2, H, W), the mask that blends the first frame moved by it over the warped frame
    (B, 1, H, W), and the match's attention (B, hw, hw) that the displacement came from."""
    displacement: torch.Tensor
    mask: torch.Tensor
    attn: torch.Tensor


def warp_error(img, flow, target, layer=None):
    """The warp's own loss, summed over rows: for each row, the mean over WARP_BLURS of the mean
    squared error between img warped by flow and target, both blurred. At least float32.
    layer, a DancerLayer, blends img moved by its displacement over the warped image by its mask,
    as the model does."""
    dtype = torch.promote_types(torch.promote_types(img.dtype, flow.dtype), torch.float32)
    img, target = img.to(dtype), target.to(dtype)

    def moved(x):
        out = warp(x, flow)
        if layer is not None:
            out = out + layer.mask * (warp(x, layer.displacement) - out)
        return out
    with _autocast_off(img):
        err = sum((moved(blur(img, s)) - blur(target, s)).pow(2).mean(dim=(1, 2, 3)) for s in WARP_BLURS)
    return err.sum() / len(WARP_BLURS)


def match_error(attn, label, first_label, block=MATCH_BLOCK):
    """How far pose_flow's match is from a correspondence, summed over the rows: the first pose
    image's block x block means, read through the match's attention (B, hw, hw), against
    pose t's block means (mean squared error per row). The poses draw every limb in its own colour,
    so the attention that reproduces pose t's colours points at the same limb in the first pose.
    Its gradient reaches every block of the first pose, however far, which the flow's does not."""
    def blocks(x):
        return F.avg_pool2d(x.to(attn.dtype), block, ceil_mode=True).flatten(2).transpose(1, 2)
    with _autocast_off(attn):
        return (attn @ blocks(first_label) - blocks(label)).pow(2).mean(dim=(1, 2)).sum()


def _read_match_block(model, incompatible_keys):
    model._match_px = int(model.match_block)


def _flat(x):
    return x.flatten(0, 1)


def _time_major(x):
    """(B, T, ...) -> (T*B, ...), row t*B + b."""
    return x.transpose(0, 1).flatten(0, 1)


def _wide(x):
    """At least float32 (the KL of bfloat16 parameters is summed over many terms)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class VAE_Model(nn.Module):
    """Attributes keep the lab's names, so `state_dict()` keys match checkpoints written by lab code.
    With prior="learned" one more module, `prior`, predicts p(z_t | previous frame, pose_t).

    residual=True (not the lab's) makes the Generator predict the change from the previous frame,
    x_t = x_{t-1} + G(...), with G's last layer starting at zero: the untrained model copies the
    previous frame, and training starts from the copy baseline instead of from the mean image.
    It adds no parameter, so the state_dict keys are the lab's either way.

    condition="first" (not the lab's) generates every frame from the sequence's first frame
    instead of the previous one: x_t = decode(frame_transformation(x_0), pose_t, z_t). The rollout
    never reads its own output, so errors cannot compound over a long sequence; appearance comes
    from x_0 and position from the pose. With residual=True the change is from x_0. Same modules,
    same state_dict keys; "previous" is the lab's model.

    first_pose=True (not the lab's; needs condition="first") tells the model where the dancer
    stands in x_0: the features of x_0's pose (label_transformation, the pose encoder every frame
    uses) enter x_0's features through one more module, `pose_fusion`, a 1x1 convolution that
    starts at zero (so the untrained model is the one without it). Without it the model must find
    the dancer in x_0 by itself before it can move the appearance to pose t and paint the old place
    out, and with few training videos it learns their dancers by heart instead (docs/RESULTS.md).

    warp=True (not the lab's; needs residual=True) moves the frame the change is added to: one more
    module, `flow`, a 3x3 convolution on the Decoder_Fusion output starting at zero, predicts a
    displacement per pixel, and x_t = warp(x_prev, flow) + G(...). A warp carries the first frame's
    pixels, colours and all, to where the pose puts them, and can pull wall over the place the
    dancer left; the Generator is left the corrections. Zero flow is the copy, so the untrained
    model is the one without it. The flow in pixels is the convolution's output times
    `flow_scale` (a buffer, FLOW_SCALE for new models, 1 in checkpoints written before it existed).

    pose_flow=True (not the lab's; needs warp and first_pose) adds a flow the 3x3 convolution cannot
    find, the dancer being tens of pixels from where x_0 has them: every MATCH_BLOCK x MATCH_BLOCK
    block of pose t attends over the blocks of x_0's pose (`pose_query`, `pose_key`, 1x1
    convolutions of the pose features), which gives the displacement to where that part of the
    dancer was (`pose_match`); `flow_coarse`, four convolutions on the COARSE x COARSE averages of
    the Decoder_Fusion output and of that displacement, turns them into a flow, upsampled and added
    to the fine one. Its last layer starts at zero. The match also moves x_0 by itself, a second layer: the dancer
    carried from where x_0 has them, which `dancer_mask` (a 3x3 convolution on the Decoder_Fusion
    output, then a sigmoid) blends over the warped frame. A flow cannot learn a move of tens of
    pixels from gradients that see a few pixels around where it reads; a blend of two images learns
    per pixel which is right. With the warp loss (forward's warp_loss) the match is also trained to
    be a correspondence: the first pose's colours, read through the attention, against pose t's.
    A third layer reads x_0 through the match's attention instead of moving it (`gather`: each block
    of frame t is the attention-weighted mean of x_0's blocks), blended in by `gather_mask` as the
    dancer layer is: where the match is unsure between blocks of one limb, a mean of their colours
    is still that limb's colour, while a mean of their positions, the dancer layer's displacement,
    can fall on the wall between them (the warp's own loss leaves this layer out: with it, three
    CPU-sized runs tested no higher on average, docs/RESULTS.md). The Generator sees the frame its
    change is added to: `base_view`, a 1x1 convolution of that frame starting at zero, is added to
    its input."""

    def __init__(self, F_dim=128, L_dim=32, N_dim=12, D_out_dim=192, prior="fixed", residual=False,
                 condition="previous", first_pose=False, warp=False, pose_flow=False, lab_activation=False):
        super().__init__()
        if prior not in PRIORS:
            raise ValueError(f"prior must be one of {PRIORS}, got {prior!r}")
        if condition not in CONDITIONS:
            raise ValueError(f"condition must be one of {CONDITIONS}, got {condition!r}")
        if first_pose and condition != "first":
            raise ValueError("first_pose needs condition='first' (the lab's recurrence conditions on "
                             "the previous frame)")
        if warp and not residual:
            raise ValueError("warp needs residual=True (the Generator's output is a change to the warped frame)")
        if pose_flow and not (warp and first_pose):
            raise ValueError("pose_flow needs warp=True and first_pose=True (it matches pose t against the "
                             "first frame's pose and adds to the warp's flow)")
        self.N_dim, self.prior_type, self.residual, self.condition = N_dim, prior, residual, condition
        self.frame_transformation = RGB_Encoder(3, F_dim)
        self.label_transformation = Label_Encoder(3, L_dim)
        self.Gaussian_Predictor = Gaussian_Predictor(F_dim + L_dim, N_dim)
        self.Decoder_Fusion = Decoder_Fusion(F_dim + L_dim + N_dim, D_out_dim)
        self.Generator = Generator(D_out_dim, 3)
        self.prior = Gaussian_Predictor(F_dim + L_dim, N_dim) if prior == "learned" else None
        self.pose_fusion = nn.Conv2d(L_dim, F_dim, 1) if first_pose else None
        if first_pose:
            nn.init.zeros_(self.pose_fusion.weight)
            nn.init.zeros_(self.pose_fusion.bias)
        self.flow = nn.Conv2d(D_out_dim, 2, 3, padding=1) if warp else None
        if warp:
            nn.init.zeros_(self.flow.weight)
            nn.init.zeros_(self.flow.bias)
            self.register_buffer("flow_scale", torch.tensor(FLOW_SCALE))
        self.F_dim = F_dim
        self.flow_coarse = coarse_flow_net(D_out_dim + 2) if pose_flow else None
        if pose_flow:
            self.register_buffer("match_block", torch.tensor(MATCH_BLOCK))
            self._match_px = MATCH_BLOCK
            # The block size as a Python int (a pooling size; reading the buffer would sync a GPU
            # and break CUDA-graph capture), refreshed whenever a state_dict is loaded.
            self.register_load_state_dict_post_hook(_read_match_block)
        self.pose_query = nn.Conv2d(L_dim, MATCH_DIM, 1) if pose_flow else None
        self.dancer_mask = nn.Conv2d(D_out_dim, 1, 3, padding=1) if pose_flow else None
        self.base_view = None
        # pose_flow's third layer, the first frame read through the match (`gather`), blended in
        # by its own mask, starting as the dancer layer's does.
        self.gather_mask = nn.Conv2d(D_out_dim, 1, 3, padding=1) if pose_flow else None
        if pose_flow:
            for mask in (self.dancer_mask, self.gather_mask):
                nn.init.zeros_(mask.weight)
                nn.init.constant_(mask.bias, MASK_START)
            # The frame the Generator's change is added to (warped, both layers blended in),
            # through a 1 x 1 convolution added to the Generator's input, so that the change can
            # correct what the warp and the layer left (ghosts, doubled limbs) instead of guessing
            # it from the features. Starts at zero: the untrained model is the one without it.
            self.base_view = nn.Conv2d(3, D_out_dim, 1)
            nn.init.zeros_(self.base_view.weight)
            nn.init.zeros_(self.base_view.bias)
        # No bias on the keys: it would add the same amount to every key a query is compared with.
        self.pose_key = nn.Conv2d(L_dim, MATCH_DIM, 1, bias=False) if pose_flow else None
        if residual:
            nn.init.zeros_(self.Generator[-1].weight)
            nn.init.zeros_(self.Generator[-1].bias)
        self._start_at_the_prior(F_dim + L_dim)
        if lab_activation:
            # The lab's code writes nn.LeakyReLU(True) in these two modules: negative_slope=True, a
            # slope of 1, the identity. Its checkpoints compute their function only with it.
            acts = [self.label_transformation[3], self.Gaussian_Predictor[5]]
            acts += [self.prior[5]] if self.prior is not None else []
            for act in acts:
                act.negative_slope = 1.0

    @torch.no_grad()
    def _start_at_the_prior(self, z_start):
        """Initialise the model as a deterministic predictor whose posterior equals the prior.

        With default initialisation the posterior starts far from N(0, I) (a KL gradient ~1,000x
        the reconstruction gradient) and the decoder reads z, pure noise at first, through random
        weights: training sits at the mean image for hundreds of steps. Here the last layer of the
        Gaussian predictor (and of the learned prior) starts at zero, so q = p = N(0, I) and the
        KL is 0, and every weight that reads the z channels of the Decoder_Fusion input (channels
        z_start...) starts at zero, so the first frames do not depend on z. Both are ordinary
        weights that train from there; only the starting point differs from PyTorch's default."""
        for predictor in (self.Gaussian_Predictor, self.prior):
            if predictor is not None:
                nn.init.zeros_(predictor[-1].weight)
                nn.init.zeros_(predictor[-1].bias)
        # z enters as the last channels of the concatenation. Block 0 (a DepthConvBlock) keeps
        # them on its identity path, so zero its two input convolutions' z columns and those of
        # block 1 (a ResidualBlock), the first layer that reduces the channels.
        fusion = self.Decoder_Fusion
        for conv in (fusion[0].block[0].conv1[0], fusion[0].block[1].conv, fusion[1].conv1, fusion[1].adaptor):
            conv.weight[:, z_start:] = 0

    # ---- pieces -------------------------------------------------------------------------------
    @staticmethod
    def _ckpt(fn, *args):
        # Activation checkpointing keeps fn's inputs and outputs and recomputes its intermediate
        # tensors in the backward pass. Never used for label_transformation: recomputing BatchNorm
        # in training mode would update its running statistics twice.
        return checkpoint(fn, *args, use_reentrant=False)

    def condition_features(self, first_feat, first_label_feat=None):
        """Features of the frame every frame is generated from under condition="first": those of
        x_0, plus those of its pose through pose_fusion when first_pose is on. With pose_flow the
        pose's features follow as L_dim more channels (the flow matches pose t against them), so
        every path that passes these features on passes them too; `_split` takes them apart."""
        if self.pose_fusion is None:
            return first_feat
        if first_label_feat is None:
            raise ValueError("a first_pose model needs the first frame's pose")
        feat = first_feat + self.pose_fusion(first_label_feat)
        return feat if self.flow_coarse is None else torch.cat([feat, first_label_feat], 1)

    def _split(self, prev_feat):
        """Conditioning features -> (frame features, the first pose's features or None)."""
        if self.flow_coarse is None:
            return prev_feat, None
        return prev_feat[:, :self.F_dim], prev_feat[:, self.F_dim:]

    def encode_first(self, first, first_label=None):
        """first (B, 3, H, W) and, for first_pose, its pose (B, 3, H, W) -> condition_features."""
        pose = None if self.pose_fusion is None or first_label is None else self.label_transformation(first_label)
        return self.condition_features(self.frame_transformation(first), pose)

    def encode_labels(self, labels, chunk=1024):
        """labels (M, 3, H, W) -> features (M, L, H, W); chunked so long sequences fit in memory."""
        if labels.shape[0] <= chunk:
            return self.label_transformation(labels)
        return torch.cat([self.label_transformation(c) for c in labels.split(chunk)])

    def prior_params(self, prev_feat, label_feat):
        """(mu, logvar) of p(z_t | ...): zeros for the fixed N(0, I) prior, else the learned prior's."""
        if self.prior is None:
            shape = (prev_feat.shape[0], self.N_dim, *prev_feat.shape[2:])
            zero = prev_feat.new_zeros(shape)
            return zero, zero
        _, mu, logvar = self.prior(self._split(prev_feat)[0], label_feat)
        return mu, logvar

    def decode(self, prev_feat, label_feat, z, prev_img):
        """Features of the previous frame, of pose t, and z_t -> frame t (unclamped). prev_img, the
        previous frame itself, is used only by the residual option."""
        return self._decode(prev_feat, label_feat, z, prev_img)[0]

    def _decode(self, prev_feat, label_feat, z, prev_img):
        """decode(), the flow in pixels (None without warp) and pose_flow's DancerLayer (else None)."""
        prev_feat, first_pose_feat = self._split(prev_feat)
        # z in the features' dtype: z from float32 noise would make the fusion's input, and with it
        # the residual stream of its first block, float32 under autocast (a cast per convolution).
        fused = self.Decoder_Fusion(prev_feat, label_feat, z.to(prev_feat.dtype))
        flow = layer = None
        first = prev_img
        if self.flow is not None:
            flow = self.flow(fused)
            if self.flow_coarse is not None:
                pooled = F.avg_pool2d(fused, COARSE, ceil_mode=True)
                attn, hw = self._match_attn(label_feat, first_pose_feat)
                match = self._displacement(attn, hw, self._match_px)  # at least float32, kept so for the layer
                on_coarse = F.avg_pool2d(match, COARSE // self._match_px, ceil_mode=True)  # the flow's grid
                coarse = self.flow_coarse(torch.cat([pooled, on_coarse.to(pooled.dtype)], 1))
                flow = flow + F.interpolate(coarse, size=fused.shape[-2:], mode="bilinear", align_corners=False)
                match = F.interpolate(match, size=fused.shape[-2:], mode="bilinear", align_corners=False)
                layer = DancerLayer(match * self.flow_scale, torch.sigmoid(self.dancer_mask(fused)), attn)
                dancer = warp(prev_img, layer.displacement)
            flow = flow * self.flow_scale
            prev_img = warp(prev_img, flow)
            if layer is not None:
                prev_img = prev_img + layer.mask * (dancer - prev_img)
                gathered = gather(first, attn, self._match_px)
                prev_img = prev_img + torch.sigmoid(self.gather_mask(fused)) * (gathered - prev_img)
        if self.base_view is not None:  # pose_flow: the Generator sees the frame it changes
            fused = fused + self.base_view(prev_img.to(fused.dtype))
        out = self.Generator(fused)
        return (prev_img + out if self.residual else out), flow, layer

    def pose_match(self, label_feat, first_pose_feat):
        """Where each match block of pose t was in the first frame's pose: attention of
        every block of pose t (query) over every block of the first pose (key), the expected
        position minus the block's own, in FLOW_SCALE pixels, (B, 2, h, w). In at least float32."""
        return self._displacement(*self._match_attn(label_feat, first_pose_feat), self._match_px)

    @staticmethod
    def _displacement(attn, hw, block):
        """pose_match from the match's attention, the blocks' grid (h, w) and their size in pixels."""
        h, w = hw
        y, x = torch.meshgrid(torch.arange(h, device=attn.device, dtype=attn.dtype),
                              torch.arange(w, device=attn.device, dtype=attn.dtype), indexing="ij")
        pos = torch.stack([x.flatten(), y.flatten()], -1)  # (hw, 2) in blocks, x first like a flow
        with _autocast_off(attn):
            return (attn @ pos - pos).transpose(1, 2).unflatten(2, (h, w)) * (block / FLOW_SCALE)

    def _match_attn(self, label_feat, first_pose_feat):
        """The pose match's attention (B, hw of pose t, hw of the first pose) and (h, w), in at least
        float32."""
        q = self.pose_query(F.avg_pool2d(label_feat, self._match_px, ceil_mode=True))
        k = self.pose_key(F.avg_pool2d(first_pose_feat, self._match_px, ceil_mode=True))
        h, w = q.shape[-2:]
        dtype = torch.promote_types(q.dtype, torch.float32)
        q, k = q.flatten(2).transpose(1, 2).to(dtype), k.flatten(2).to(dtype)  # (B, hw, d), (B, d, hw)
        with _autocast_off(q):
            return torch.softmax(q @ k / MATCH_DIM ** 0.5, dim=-1), (h, w)

    def _warp_sum(self, prev_img, flow, layer, target, poses):
        """The warp's own loss summed over the rows: warp_error, and with pose_flow's layer the
        match's error (match_error; poses = (pose t, the first pose) images), or a zero when the
        warp loss is off (target None; forward refuses the loss for a model without a flow)."""
        if target is None:
            return prev_img.new_zeros((), dtype=torch.float32)
        err = warp_error(prev_img, flow, target, layer)
        return err if layer is None else err + match_error(layer.attn, *poses, self._match_px)

    def _frame_terms(self, prev_feat, prev_img, feat, label_feat, eps, target=None, poses=None):
        """The training terms of predicted frames (rows): z_t ~ q(z | x_t, pose_t) from the true
        frame's features `feat`, the frame decoded from the previous one, KL(q || p) summed, and
        the warp's own loss summed when `target` (the true frames) is given (`_warp_sum`). One function, so
        activation checkpointing can recompute a group of frames as a unit."""
        z, mu, logvar = self.Gaussian_Predictor(feat, label_feat, eps)
        pred, flow, layer = self._decode(prev_feat, label_feat, z, prev_img)
        if self.prior is None:
            kl = kl_standard_normal(_wide(mu), _wide(logvar))
        else:
            mu_p, logvar_p = self.prior_params(prev_feat, label_feat)
            kl = kl_gaussians(_wide(mu), _wide(logvar), _wide(mu_p), _wide(logvar_p))
        return pred, kl.sum(), self._warp_sum(prev_img, flow, layer, target, poses)

    # ---- training -----------------------------------------------------------------------------
    def forward(self, img, label, teacher_forcing=True, eps=None, beta=1.0, recon="mse",
                fast=True, grad_ckpt=False, warp_loss=0.0):
        """One training pass over sequences.

        img, label: (B, T, 3, H, W). teacher_forcing: a bool, or a bool sequence of length T-1 (one
        entry per predicted frame). eps: (B, T-1, N, H, W) posterior noise, drawn here if None.
        Frame t (1..T-1) is decoded from the previous frame (true under teacher forcing, else the
        model's own clamped output), pose t and z_t ~ q(z | x_t, pose_t).

        fast=True runs all teacher-forced frames as one batch of B*(T-1); fast=False is the plain
        per-frame loop (the reference in tests). Both compute the same function.
        grad_ckpt=True recomputes the frames in the backward pass one time step (B frames) at a
        time, so the activations held at once are those of B frames, not B*(T-1)
        (`_forward_checkpointed`, same function).
        warp_loss > 0 (a warp model only) adds the warp's own loss with that weight: the frame the
        change is added to (warped by the predicted flow; for pose_flow, with the dancer layer
        blended in) against the true frame (warp_error), and for pose_flow the match's error
        (match_error).
        Returns dict(loss, recon, kl, warp, pred) with pred (B, T-1, 3, H, W) unclamped.
        loss = recon + beta * kl + warp_loss * warp; recon is the mean per-pixel error, kl the KL
        summed over the latent map and averaged over samples and frames, warp the warp error
        averaged over samples and frames, the match's added for pose_flow (0 when warp_loss is 0).
        """
        B, T = img.shape[:2]
        tf = [bool(teacher_forcing)] * (T - 1) if isinstance(teacher_forcing, bool) else [bool(x) for x in teacher_forcing]
        if len(tf) != T - 1:
            raise ValueError(f"teacher_forcing needs {T - 1} entries, got {len(tf)}")
        if warp_loss and self.flow is None:
            raise ValueError("warp_loss needs a warp model")
        if recon not in RECONS:
            raise ValueError(f"recon must be one of {RECONS}, got {recon!r}")
        if grad_ckpt and torch.is_grad_enabled():
            return self._forward_checkpointed(img, label, tf, eps, beta, recon, fast, warp_loss)
        # Labels and the posterior see only ground truth, so they run as one batch in both paths
        # (which also gives BatchNorm the same batch statistics in both). first_pose also reads
        # frame 0's pose, in the same batch.
        skip = 0 if self.pose_fusion is not None else 1
        label_feat = self.label_transformation(_flat(label[:, skip:])).unflatten(0, (B, T - skip))
        first_label_feat, label_feat = (label_feat[:, 0], label_feat[:, 1:]) if skip == 0 else (None, label_feat)
        if fast:
            frame_feat = self.frame_transformation(_flat(img)).unflatten(0, (B, T))
        else:
            frame_feat = torch.stack([self.frame_transformation(img[:, t]) for t in range(T)], 1)
        if eps is None:
            eps = torch.randn((B, T - 1, self.N_dim, *img.shape[-2:]), device=img.device)
        z, mu, logvar = self.Gaussian_Predictor(_flat(frame_feat[:, 1:]), _flat(label_feat), _flat(eps))
        z = z.unflatten(0, (B, T - 1))  # reparameterised sample of q(z_t | x_t, pose_t)

        anchored = self.condition == "first"  # every frame from frame 0: teacher forcing is moot
        cond = self.condition_features(frame_feat[:, 0], first_label_feat) if anchored else None
        if fast and (anchored or all(tf)):
            if anchored:
                prev_feat = cond[:, None].expand(-1, T - 1, *cond.shape[1:])
                prev_img = img[:, :1].expand(-1, T - 1, *img.shape[2:])
            else:
                prev_feat, prev_img = frame_feat[:, :-1], img[:, :-1]
            pred, flow, layer = self._decode(_flat(prev_feat), _flat(label_feat), _flat(z), _flat(prev_img))
            target, poses = None, None
            if warp_loss:
                target = _flat(img[:, 1:])
                poses = (_flat(label[:, 1:]), _flat(label[:, :1].expand(-1, T - 1, *label.shape[2:])))
            warp_sum = self._warp_sum(_flat(prev_img), flow, layer, target, poses)
            pred = pred.unflatten(0, (B, T - 1))
        else:
            preds, prev_feats, out, warp_sum = [], [], None, 0.0
            for t in range(1, T):
                if anchored:
                    prev_img, prev = img[:, 0], cond
                elif t == 1 or tf[t - 1]:
                    prev_img = img[:, t - 1]
                    prev = frame_feat[:, t - 1] if fast else self.frame_transformation(prev_img)
                else:
                    prev_img = out.clamp(0, 1)
                    prev = self.frame_transformation(prev_img)
                out, flow, layer = self._decode(prev, label_feat[:, t - 1], z[:, t - 1], prev_img)
                warp_sum = warp_sum + self._warp_sum(prev_img, flow, layer, img[:, t] if warp_loss else None,
                                                     (label[:, t], label[:, 0]))
                preds.append(out)
                prev_feats.append(prev)
            pred = torch.stack(preds, 1)
            prev_feat = torch.stack(prev_feats, 1)

        target = img[:, 1:]
        rec = F.mse_loss(pred, target) if recon == "mse" else F.l1_loss(pred, target)
        if self.prior is None:
            kl = kl_standard_normal(_wide(mu), _wide(logvar))
        else:
            mu_p, logvar_p = self.prior_params(_flat(prev_feat), _flat(label_feat))
            kl = kl_gaussians(_wide(mu), _wide(logvar), _wide(mu_p), _wide(logvar_p))
        return self._terms(rec, kl.sum(), warp_sum, B * (T - 1), beta, warp_loss, pred)

    @staticmethod
    def _terms(rec, kl_sum, warp_sum, frames, beta, warp_loss, pred):
        kl, warp_mean, rec = kl_sum / frames, warp_sum / frames, _wide(rec)
        return dict(loss=rec + beta * kl + warp_loss * warp_mean, recon=rec, kl=kl, warp=warp_mean, pred=pred)

    def _forward_checkpointed(self, img, label, tf, eps, beta, recon, fast, warp_loss=0.0):
        """forward() with activation checkpointing per time step. Frames are flattened time-major
        (row t*B + b), so a time step's frames, frames 0..T-2 and frames 1..T-1 are contiguous
        row ranges (views, channels_last kept). The frame encoder and each time step's posterior,
        decoder and KL run under one checkpoint each."""
        B, T = img.shape[:2]
        if eps is None:
            eps = torch.randn((B, T - 1, self.N_dim, *img.shape[-2:]), device=img.device)
        img_tm, eps_tm = _time_major(img), _time_major(eps)
        skip = 0 if self.pose_fusion is not None else 1
        label_feat = self.label_transformation(_time_major(label[:, skip:]))  # one batch, as in forward()
        first_label_feat, label_feat = (label_feat[:B], label_feat[B:]) if skip == 0 else (None, label_feat)
        if fast:
            frame_feat = torch.cat([self._ckpt(self.frame_transformation, x) for x in img_tm.split(B)])
        else:
            frame_feat = torch.cat([self.frame_transformation(img[:, t]) for t in range(T)])

        anchored = self.condition == "first"  # every frame from frame 0: teacher forcing is moot
        cond = self.condition_features(frame_feat[:B], first_label_feat) if anchored else None
        preds, kl, warp_sum = [], 0.0, 0.0
        if fast and (anchored or all(tf)):
            for t in range(1, T):  # one time step (B frames) per recomputed group
                now, before = slice(t * B, (t + 1) * B), slice((t - 1) * B, t * B)
                prev = slice(0, B) if anchored else before
                pred, k, w = self._ckpt(self._frame_terms, cond if anchored else frame_feat[prev], img_tm[prev],
                                        frame_feat[now], label_feat[before], eps_tm[before],
                                        img_tm[now] if warp_loss else None, (label[:, t], label[:, 0]))
                preds.append(pred)
                kl, warp_sum = kl + k, warp_sum + w
        else:
            out = None
            for t in range(1, T):
                r = slice((t - 1) * B, t * B)  # rows of frame t-1, and of pose t / eps t
                if anchored:
                    prev_img, prev = img_tm[:B], cond
                elif t == 1 or tf[t - 1]:
                    prev_img = img_tm[r]
                    prev = frame_feat[r] if fast else self.frame_transformation(prev_img)
                else:
                    prev_img = out.clamp(0, 1)
                    prev = self._ckpt(self.frame_transformation, prev_img)
                out, k, w = self._ckpt(self._frame_terms, prev, prev_img, frame_feat[t * B:(t + 1) * B],
                                       label_feat[r], eps_tm[r], img_tm[t * B:(t + 1) * B] if warp_loss else None,
                                       (label[:, t], label[:, 0]))
                preds.append(out)
                kl, warp_sum = kl + k, warp_sum + w
        pred = torch.cat(preds)
        target = img_tm[B:]
        rec = F.mse_loss(pred, target) if recon == "mse" else F.l1_loss(pred, target)
        return self._terms(rec, kl, warp_sum, B * (T - 1), beta, warp_loss,
                           pred.unflatten(0, (T - 1, B)).transpose(0, 1))

    # ---- generation ---------------------------------------------------------------------------
    def step(self, prev_img, label_feat, eps, z_mode="sample", prev_feat=None):
        """One generated frame: previous image (B, 3, H, W) (the first frame under
        condition="first"), pose features of frame t and noise eps (B, N, H, W) -> frame t clamped
        to [0, 1]. z = prior mean + eps * prior std ("sample"), the prior mean ("prior_mean"), or
        0 ("zero"). prev_feat, when given, is frame_transformation(prev_img) computed already (for
        condition="first", encode_first(...): a first_pose model needs it, the step has no pose of
        prev_img)."""
        if prev_feat is None:
            prev_feat = self.frame_transformation(prev_img)
        mu, logvar = self.prior_params(prev_feat, label_feat)
        if z_mode not in Z_MODES:
            raise ValueError(f"z_mode must be one of {Z_MODES}, got {z_mode!r}")
        if z_mode == "sample":
            z = mu + eps * torch.exp(0.5 * logvar)
        elif z_mode == "prior_mean":
            z = mu
        else:
            z = torch.zeros_like(mu)
        return self.decode(prev_feat, label_feat, z, prev_img).clamp(0, 1)

    def sample_noise(self, B, L, H, W, generator=None, device=None):
        """Noise for a rollout of L frames: (L-1, B, N, H, W), drawn in one call so that a seed gives
        the same z whatever the path that consumes it."""
        return torch.randn((L - 1, B, self.N_dim, H, W), generator=generator, device=device)

    @torch.no_grad()
    def generate(self, first, labels, eps, z_mode="sample", step_fn=None, label_feat=None):
        """Autoregressive rollout. first (B, 3, H, W), labels (B, L, 3, H, W), eps (L-1, B, N, H, W).
        Returns (B, L, 3, H, W) float32; frame 0 is `first`. Pose features are computed once up
        front (or passed in as label_feat (B, L-1, L_dim, H, W)); `step_fn(prev, label_feat_t,
        eps_t)` (default self.step) lets a caller substitute a captured step. A first_pose model
        needs `labels` (frame 0's pose) and its own step."""
        if label_feat is None:
            B, L = labels.shape[:2]
            label_feat = self.encode_labels(_flat(labels[:, 1:])).unflatten(0, (B, L - 1))
        if self.pose_fusion is not None:
            if step_fn is not None or labels is None:
                raise ValueError("generate with a first_pose model takes the labels and no step_fn")
            feat = self.encode_first(first, labels[:, 0])  # encoded once
            step_fn = lambda p, lf, e: self.step(p, lf, e, z_mode, prev_feat=feat)  # noqa: E731
        step_fn = step_fn or (lambda p, lf, e: self.step(p, lf, e, z_mode))
        out, prev = [first.float()], first
        for t in range(label_feat.shape[1]):
            prev = step_fn(first if self.condition == "first" else prev, label_feat[:, t], eps[t])
            out.append(prev.float())
        return torch.stack(out, 1)

    @torch.no_grad()
    def generate_from_first(self, first, label_feat, eps, z_mode="sample", chunk=256, first_label=None):
        """The rollout of condition="first" as batches of frames instead of a loop: no frame
        depends on another, so up to `chunk` frames (of all sequences) run at once and the first
        frames are encoded once. first (B, 3, H, W), label_feat (B, L-1, L_dim, H, W), eps
        (L-1, B, N, H, W), first_label (B, 3, H, W) the first frames' poses (read by a first_pose
        model only). Same function as `generate`; returns (B, L, 3, H, W) float32."""
        if self.condition != "first":
            raise ValueError("generate_from_first needs condition='first'")
        B, n = label_feat.shape[:2]
        feat = self.encode_first(first, first_label)
        per = max(1, chunk // B)  # frames per batch

        def rep(x, k):  # (B, ...) -> (B * k, ...), sequence-major like label_feat's flattening
            return x[:, None].expand(B, k, *x.shape[1:]).flatten(0, 1)
        out = [first.float()[:, None]]
        for lo in range(0, n, per):
            k = min(per, n - lo)
            frames = self.step(rep(first, k), label_feat[:, lo:lo + k].flatten(0, 1),
                               eps[lo:lo + k].transpose(0, 1).flatten(0, 1), z_mode, prev_feat=rep(feat, k))
            out.append(frames.unflatten(0, (B, k)).float())
        return torch.cat(out, 1)

    @torch.no_grad()
    def generate_plain(self, first, labels, eps, z_mode="sample"):
        """Reference rollout the straightforward way: one sequence at a time, the pose encoded
        inside the per-frame loop. Same function as `generate`; used by tests and the benchmark."""
        seqs = []
        for b in range(first.shape[0]):
            prev, out = first[b:b + 1], [first[b:b + 1]]
            for t in range(1, labels.shape[1]):
                label_feat = self.label_transformation(labels[b:b + 1, t])
                feat = None
                if self.condition == "first":
                    prev = first[b:b + 1]
                    feat = self.encode_first(prev, labels[b:b + 1, 0])
                prev = self.step(prev, label_feat, eps[t - 1, b:b + 1], z_mode, prev_feat=feat)
                out.append(prev)
            seqs.append(torch.stack(out, 1))
        return torch.cat(seqs)
