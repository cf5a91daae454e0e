"""Train the shipped Shapes World models (SHAPES_WORLD.md) from scratch.

    python -m blendedit.toy.train data   --out runs/toy/data          # render the data set
    python -m blendedit.toy.train clip   --data runs/toy/data --out runs/toy/clip
    python -m blendedit.toy.train vae    --data runs/toy/data --out runs/toy/vae
    python -m blendedit.toy.train unet   --data runs/toy/data --clip runs/toy/clip \
                                         --vae runs/toy/vae --out runs/toy/unet
    python -m blendedit.toy.train pixel  --data runs/toy/data --out runs/toy/pixel
    python -m blendedit.toy.train guide-clip --out runs/toy/guide-clip   # CLIP on the pixel x̂0
    python -m blendedit.toy.train assemble --work runs/toy --dest src/blendedit/assets/toy

(also ``blendedit train-toy ...``). Every run writes to its ``--out`` folder: ``checkpoint.pt``
(model, EMA, optimizer, step, wall time; loaded with ``torch.load(weights_only=True)``),
``loss.csv`` and, at the end, ``model/`` (diffusers / transformers format) and ``card.md``.
Running the same command again resumes from the checkpoint; a larger ``--steps`` extends a
finished run. The data stream is a function of (seed, step), so a resumed run sees the batches an
uninterrupted one would have.

Modules: ``arch`` (configs), ``loop`` (the shared training loop), ``clip``, ``vae``, ``unet``,
``pixel`` (one per model), ``guide_clip`` (Blended Diffusion's guidance CLIP), ``snapshots``,
``assemble`` (the shipped folder) and ``cli``; what the evaluation shares with them is in
:mod:`blendedit.toy.common`.
"""

import time  # noqa: F401 (tests pause the clock through it)

from ..common import (  # noqa: F401
    CLASS_PROMPTS,
    CLIP_IMAGE_SIZE,
    CLIP_MEAN,
    CLIP_STD,
    MEASURED,
    TEXT_MAX_LENGTH,
    clip_pixels,
    image_batch,
    predict_x0,
    tokenize,
)
from ..data import train_caption  # noqa: F401
from ..world import coverage  # noqa: F401
from .arch import (  # noqa: F401
    LATENT_SCHEDULER,
    PIXEL_CONFIG,
    PIXEL_SCHEDULER,
    SAMPLING_FILE,
    TEXT_ENCODER,
    UNET_CONFIG,
    UNET_GRID32,
    UNET_POOLED_TEXT,
    UNET_RUN_CONFIG,
    VAE_CONFIG,
    VAE_FACTORS,
    VISION_PATCH_KEY,
    ZERO_SNR_SAMPLING,
    VisionClassifier,
    _latent_ddpm,
    _unet_config,
    clip_config,
    clip_vision_config,
    vae_config,
    vae_factor,
    world_words,
    write_preprocessor,
)
from .assemble import (  # noqa: F401
    GUIDANCE_MEASURED,
    SHIPPED_MB,
    SHIPPED_PARTS,
    _card_chain,
    _card_head,
    _drop_load_flags,
    _model_folder,
    _newer,
    _sampling,
    assemble,
)
from .cli import (  # noqa: F401
    DEFAULTS,
    build_parser,
    main,
)
from .clip import (  # noqa: F401
    _dihedral,
    _fitting_weights,
    _object_crop,
    _vision_labels,
    train_clip,
    train_vision,
    vision_accuracy,
)
from .loop import (  # noqa: F401
    Run,
    RunInfo,
    _data_folders,
    _model_dir,
    _rng,
    command_line,
    train_device,
    write_card,
)
from .pixel import (  # noqa: F401
    train_pixel,
)
from .snapshots import (  # noqa: F401
    _model_kind,
    _split_prefix,
    snapshot,
)
from .unet import (  # noqa: F401
    _Concat,
    _encode_latents,
    _min_snr_weight,
    _noise_and_steps,
    train_unet,
)
from .vae import (  # noqa: F401
    _band_uint8,
    _Denoiser,
    _per_image_mean,
    _weighted_rec_loss,
    band_cache,
    object_band,
    object_cells,
    train_vae,
)
