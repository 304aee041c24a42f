"""The owner's side: backups, restores and the repository they read and write.

Nouns:

* **repository** (:mod:`.repository`) — one owner's packs on its peers, and the
  **index** (:mod:`.index`, SQLite) that finds them; the **run state**
  (:mod:`.runstate`) is what it learns of its peers in one run; a pack's
  **shards** (:mod:`.shards`) are coded and checked in worker threads; the
  **root record** (:mod:`.rootrecord`) names the live snapshots and index packs.
* **backup** (:mod:`.backup`) — directory trees into a snapshot: the **walk**
  (:mod:`.walk`, listed ahead by the **lister** process of :mod:`.lister`,
  talking :mod:`.listwire`) feeds the **pipeline**
  (:mod:`.pipeline`) that reads (:mod:`.reading`, and the **sealer** processes
  of :mod:`.sealer`, talking :mod:`.sealwire`), packs, codes and places.
* **restore** (:mod:`.restore`), **snapshots** (:mod:`.snapshots`), **prune**
  (:mod:`.prune`), **check** (:mod:`.check`).
* **children** (:mod:`.children`) — what the sealers and the lister share,
  and the frames on their pipes (:mod:`.pipeframes`);
  **progress** (:mod:`.progress`) — the lines long work reports through;
  **runtime** (:mod:`.runtime`) — process-wide tuning for bulk work.

May import: core, net, wire, stores, dht.
"""
