"""Twenty socket.io clients from twenty loopback addresses (127.3.0.1 ...), each on long-polling with a
new TCP connection per request: every answer names the worker that holds the session.

Usage: python3 client.py [PORT]        (the cluster of sticky-cluster.yaml listens on 8080)
"""

import asyncio
import sys

import aiohttp
import socketio


async def session(address, port):
    http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(address, 0), force_close=True))
    client = socketio.AsyncClient(http_session=http, reconnection=False)
    try:
        await client.connect("http://127.0.0.1:%d" % port, transports=["polling"], wait_timeout=5)
        answers = [await client.call("whoami", timeout=5) for _ in range(3)]
        workers = sorted({answer["worker"] for answer in answers})
        print("%-12s worker %s, 3 of 3 answers (pid %s)" % (address, ",".join(workers), answers[0]["pid"]))
        await client.eio.disconnect(abort=True)
    except Exception as error:
        print("%-12s failed: %s" % (address, error))
    finally:
        await http.close()


async def main(port):
    asyncio.get_running_loop().set_exception_handler(lambda loop, context: None)
    await asyncio.gather(*(session("127.3.0.%d" % i, port) for i in range(1, 21)))


asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 8080))
