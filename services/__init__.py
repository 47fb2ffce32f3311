"""The three ECTrans services: dispatcher, worker, monitor."""
