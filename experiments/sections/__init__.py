"""The reproduction report's sections, in the report's order: each module declares one
`SECTION` (its runs, tables, figures and verdicts; see `experiments.report.Section`)."""

from experiments.sections import (adding, cells, char_lm, convnet, divisive, graphs, lr_sweep, mlp, pixel,
                                  relatives, table1)

SECTIONS = tuple(m.SECTION for m in (table1, mlp, cells, lr_sweep, pixel, char_lm, adding, convnet, relatives,
                                     divisive, graphs))
