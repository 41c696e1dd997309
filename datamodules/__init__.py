"""LightningDataModules, one file per data family, each with a built-in default that needs no network."""

from datamodules.instruction import InstructionDataModule, load_instruction_records
from datamodules.preference import PreferenceDataModule
from datamodules.sequence_tasks import SequenceTasksDataModule
from datamodules.text import TextDataModule
from datamodules.qdpo_pairs import QDPOPairsDataModule
from datamodules.offline_rl import OfflineRLDataModule

__all__ = ["OfflineRLDataModule", "InstructionDataModule", "load_instruction_records", "PreferenceDataModule", "SequenceTasksDataModule", "TextDataModule", "QDPOPairsDataModule"]
