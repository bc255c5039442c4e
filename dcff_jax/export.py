"""The compact export's former single module, kept so that `dcff_jax.export.load_compact` and
the other names it had keep working: they live in dcff_jax.deploy (compact, versions,
stablehlo)."""

from dcff_jax.deploy.compact import (  # noqa: F401
    compact_variables,
    load_compact,
    metadata_of,
    model_of,
    save_compact,
    write_export,
)
from dcff_jax.deploy.stablehlo import (  # noqa: F401
    STABLEHLO,
    STABLEHLO_PAD_TO,
    STABLEHLO_PLATFORMS,
    batch_polymorphic_stablehlo,
    load_stablehlo,
    stablehlo_bytes,
    write_stablehlo,
)
from dcff_jax.deploy.versions import (  # noqa: F401
    DIGESTS,
    KEEP_VERSIONS,
    POINTER,
    current_version_dir,
    read_metadata,
    read_verified,
    with_digest,
    write_beside_metadata,
)
