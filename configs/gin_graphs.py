"""Graph normalizations (Chen et al. 2020) on the "denser colour" graphs (experiments/data.py):
a 3-layer GIN-style classifier (`experiments.models.gin`), 2000 training and 1000 test graphs,
batches of 64 graphs, Adam 1e-2.

`model.norm` is any lnjax.norms name; the graph ones are graph_node, graph_adjacency, graph,
graph_batch and graph_learned (the last two keep running statistics, momentum 0.9).
"""

from configs.base import base_config


def get_config():
    c = base_config()
    c.name = "gin_graphs"
    c.task.name = "colour_graphs"
    c.task.train_size = 2000
    c.task.test_size = 1000
    c.task.seed = 0  # the graphs' (model seeds are `sweep.seed`)
    c.model.kind = "gin"
    c.model.hidden = (32, 32, 32)  # one message-passing layer each
    c.model.norm = "graph"
    c.model.readout = "mean"  # or "sum": over each graph's nodes
    c.optimizer.learning_rate = 1e-2
    c.optimizer.grad_clip = 0.0
    c.batch_size = 64  # graphs
    c.num_steps = 1000
    c.eval_every = 100
    c.checkpoint_every = 500
    return c
