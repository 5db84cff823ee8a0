"""ComfyUI nodes: thin adapters over iddm_core.

Importing this package must stay cheap (ComfyUI imports every custom node pack at start-up): the node modules
import only the standard library at module level; torch-heavy code (diffusers, transformers, dlib, kornia) is
imported inside the node functions when a workflow actually runs.
"""
from .comfy_env import register_model_folders
from .errors import plain_errors
from .leak_meter import IdentityLeakMeter
from .loss_node import IDDMFaceEnsembleLoss
from .pgd_node import IDDMPGDTwoStage
from .portraits_node import IDDMPortraits
from .protect_node import ProtectPhotos
from .refs_node import LoadPrivateRefs
from .save_node import SaveImageNoMetadata
from .train_node import IDDMTrainLoRA

register_model_folders()

NODE_CLASS_MAPPINGS = {
    "IDDMLoadPrivateRefs": LoadPrivateRefs,
    "IDDMFaceEnsembleLoss": IDDMFaceEnsembleLoss,
    "IDDMPGDTwoStage": IDDMPGDTwoStage,
    "IDDMTrainLoRA": IDDMTrainLoRA,
    "IDDMIdentityLeakMeter": IdentityLeakMeter,
    "IDDMSaveImageNoMetadata": SaveImageNoMetadata,
    "IDDMProtectPhotos": ProtectPhotos,
    "IDDMPortraits": IDDMPortraits,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "IDDMLoadPrivateRefs": "Load Private Refs (IDDM)",
    "IDDMFaceEnsembleLoss": "Face Ensemble Loss (IDDM)",
    "IDDMPGDTwoStage": "PGD Two-Stage (IDDM)",
    "IDDMTrainLoRA": "IDDM Train LoRA",
    "IDDMIdentityLeakMeter": "Identity Leak Meter (IDDM)",
    "IDDMSaveImageNoMetadata": "Save Image (no metadata)",
    "IDDMProtectPhotos": "Protect Photos for Posting",
    "IDDMPortraits": "IDDM Portraits (any pack model + LoRA)",
}

# ComfyUI shows an error as "<module>.<class>: message" (see errors.py): every node re-raises library errors
# under their plain class names.
for _cls in NODE_CLASS_MAPPINGS.values():
    plain_errors(_cls)

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
