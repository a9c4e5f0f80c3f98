"""Short faithful transcriptions of the official fine-tuning optimizer groups, as the tests'
reference: MCG-NJU/VideoMAE ``optim_factory.py`` (``get_num_layer_for_vit``,
``LayerDecayValueAssigner``, ``get_parameter_groups``, its ``print`` left out) and the
assigner construction of ``run_class_finetuning.py``."""
from __future__ import annotations


# optim_factory.py: get_num_layer_for_vit
def get_num_layer_for_vit(var_name, num_max_layer):
  if var_name in ("cls_token", "mask_token", "pos_embed"):
    return 0
  elif var_name.startswith("patch_embed"):
    return 0
  elif var_name.startswith("rel_pos_bias"):
    return num_max_layer - 1
  elif var_name.startswith("blocks"):
    layer_id = int(var_name.split('.')[1])
    return layer_id + 1
  else:
    return num_max_layer - 1


# optim_factory.py: LayerDecayValueAssigner
class LayerDecayValueAssigner(object):
  def __init__(self, values):
    self.values = values

  def get_scale(self, layer_id):
    return self.values[layer_id]

  def get_layer_id(self, var_name):
    return get_num_layer_for_vit(var_name, len(self.values))


# run_class_finetuning.py: the assigner for `--layer_decay` (num_layers = len(model.blocks))
def make_assigner(layer_decay, num_layers):
  if layer_decay < 1.0:
    return LayerDecayValueAssigner(
        list(layer_decay ** (num_layers + 1 - i) for i in range(num_layers + 2)))
  return None


# optim_factory.py: get_parameter_groups (returns the names dict the official code prints,
# and the vars list it returns)
def get_parameter_groups(model, weight_decay=1e-5, skip_list=(), get_num_layer=None,
                         get_layer_scale=None):
  parameter_group_names = {}
  parameter_group_vars = {}

  for name, param in model.named_parameters():
    if not param.requires_grad:
      continue  # frozen weights
    if len(param.shape) == 1 or name.endswith(".bias") or name in skip_list:
      group_name = "no_decay"
      this_weight_decay = 0.
    else:
      group_name = "decay"
      this_weight_decay = weight_decay
    if get_num_layer is not None:
      layer_id = get_num_layer(name)
      group_name = "layer_%d_%s" % (layer_id, group_name)
    else:
      layer_id = None

    if group_name not in parameter_group_names:
      if get_layer_scale is not None:
        scale = get_layer_scale(layer_id)
      else:
        scale = 1.

      parameter_group_names[group_name] = {
          "weight_decay": this_weight_decay,
          "params": [],
          "lr_scale": scale
      }
      parameter_group_vars[group_name] = {
          "weight_decay": this_weight_decay,
          "params": [],
          "lr_scale": scale
      }

    parameter_group_vars[group_name]["params"].append(param)
    parameter_group_names[group_name]["params"].append(name)
  return parameter_group_names, list(parameter_group_vars.values())


class NamedParams:
  """Stands in for an ``nn.Module``: ``named_parameters()`` over a {name: tensor} dict."""

  def __init__(self, tensors):
    self.tensors = tensors

  def named_parameters(self):
    return iter(self.tensors.items())
