//! Capacity accounting: resource budgets, the active/warm capacity ledger and admission planning. No I/O.
