"""Channel padding's former module name, kept so that `dcff_jax.channel_padding.pad_channels`
keeps working: it lives in dcff_jax.deploy.channel_padding."""

from dcff_jax.deploy.channel_maps import round_up, spread  # noqa: F401
from dcff_jax.deploy.channel_padding import conv_widths, pad_channels  # noqa: F401
