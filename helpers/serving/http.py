"""What the worker and the API server share over HTTP: work for a client stops as soon as the client goes,
and every stream it opened is closed then, explicitly.

A plain response's handler would run to its end for a client that has gone, and a stream's generators
(the API server's response, FastChat's stream of the worker's chunks inside it) would be closed only when
the garbage collector finalises them. Here a handler races the client's disconnect, and a stream closes
itself and every stream registered during its request (closes_with_response) when it ends.
"""
import asyncio
import contextvars

import anyio
from starlette.responses import JSONResponse, StreamingResponse

_open_streams = contextvars.ContextVar("open_streams", default=None)
CLIENT_GONE = 499  # the status of a response no one reads (nginx's "client closed request")


def remove_routes(app, *paths):
    """Take the routes for these paths out of a FastAPI app (FastChat's, to put checked ones in their place)."""
    removed = [route for route in app.router.routes if getattr(route, "path", None) in paths]
    for route in removed:
        app.router.routes.remove(route)
    return removed


def unavailable(message):
    """503 with OpenAI's error object: the answer of /health when the server cannot answer."""
    return JSONResponse({"status": "error", "error": {"message": message, "type": "unavailable_error", "code": 503}},
                        status_code=503)


async def client_gone(receive):
    """Returns once the client has closed its connection (call it after the request's body is read)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def unless_client_goes(request, work):
    """(True, the result of the awaitable work), or (False, None) with work cancelled as soon as the client
    of the Starlette `request` goes."""
    task, watcher = asyncio.ensure_future(work), asyncio.ensure_future(client_gone(request.receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)  # its cleanup has run when this returns
    return (False, None) if task.cancelled() else (True, task.result())


def open_streams():
    """A list that collects the streams opened from here on in this request (closes_with_response)."""
    streams = []
    _open_streams.set(streams)
    return streams


def closes_with_response(stream):
    """Register an async generator opened while answering a request: the response closes it when it ends."""
    streams = _open_streams.get()
    if streams is not None:
        streams.append(stream)
    return stream


class StreamWhileClientListens(StreamingResponse):
    """A stream that ends as soon as its client goes, between chunks too, and then closes its generator and
    the streams registered for it (`streams`, from open_streams)."""

    def __init__(self, content, streams=(), **options):
        super().__init__(content, **options)
        self.streams = streams

    async def __call__(self, scope, receive, send):
        try:
            async with anyio.create_task_group() as tasks:
                async def stream():
                    try:
                        await self.stream_response(send)
                    except OSError:  # the client went as a chunk was sent
                        pass
                    tasks.cancel_scope.cancel()

                tasks.start_soon(stream)
                await client_gone(receive)
                tasks.cancel_scope.cancel()
        except BaseExceptionGroup as group:  # the task group's wrapping of an error in the generator
            raise group.exceptions[0] if len(group.exceptions) == 1 else group
        finally:
            for opened in [self.body_iterator, *reversed(self.streams)]:
                close = getattr(opened, "aclose", None)
                if close is not None:
                    await close()
