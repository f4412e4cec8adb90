"""The method, one site at a time: the teacher-student pair a visit trains (:mod:`.pair`, with the
teacher's EMA steps), a visit (:mod:`.visit`, Ark's training step), its losses and metrics,
the gate every returned model passes (:mod:`.updates`), DDP (:mod:`.ddp`) and what a site does when the
loop asks (:mod:`.tasks`). May import site, model, data and the vocabulary; never run or federation."""
