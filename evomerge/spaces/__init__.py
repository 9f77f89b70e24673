"""Search spaces: a bounded genome (the unit cube) -> a Recipe, for PS, DFS and PS+DFS; loaded from search_spaces/*.yaml."""

from evomerge.spaces.base import Gene, SearchSpace
from evomerge.spaces.dfs import DataFlowSpace, DFSConfig
from evomerge.spaces.load import SpaceConfig, build_space, load_space_config, space_from_dict, space_from_yaml, space_models
from evomerge.spaces.ps import ParameterSpace, PSConfig

__all__ = ["Gene", "SearchSpace", "ParameterSpace", "PSConfig", "DataFlowSpace", "DFSConfig", "SpaceConfig", "build_space",
           "load_space_config", "space_from_dict", "space_from_yaml", "space_models"]
